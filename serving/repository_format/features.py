"""What this server does with each feature of Triton's model configuration that it does not serve.

config.pbtxt is parsed in Triton's complete schema, so any config Triton accepts parses; this module then names
every field set that the server does not apply.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import Message

from ..wire.inference import model_config_pb2 as mc

# The fields each message may set that this server applies. Any other field set in a config is named, never
# silently ignored: refused (ConfigError) when serving without it would give wrong answers, a warning (logged
# when a version loads, `ModelSpec.warnings`) when only an optimisation or an operator's knob is lost.
_SERVED = {
    "ModelConfig": {"name", "platform", "backend", "version_policy", "max_batch_size", "input", "output",
                    "dynamic_batching", "instance_group", "default_model_filename", "parameters"},
    "ModelInput": {"name", "data_type", "format", "dims"},
    "ModelOutput": {"name", "data_type", "dims", "label_filename"},
    "ModelInstanceGroup": {"name", "kind", "count", "gpus"},
    # preserve_ordering holds anyway: a call gets its own answer, a stream its answers in order
    "ModelDynamicBatching": {"preferred_batch_size", "max_queue_delay_microseconds", "preserve_ordering",
                             "priority_levels", "default_priority_level", "default_queue_policy"},
    "ModelQueuePolicy": {"default_timeout_microseconds", "max_queue_size"},
}
_REFUSED = {
    "ensemble_scheduling": "ensembles (a pipeline of models) are not run",
    "sequence_batching": "stateful sequences (correlation ids, sequence state) are not kept",
    "batch_input": "batch inputs (ragged batching) are not built",
    "batch_output": "batch outputs (ragged batching) are not split",
    "model_transaction_policy": "decoupled models (any number of responses per request) are not served",
    "model_operations": "custom operation libraries are not loaded",
    "model_repository_agents": "repository agents (checksums, decryption) are not run on the model",
    "reshape": "tensor reshapes are not applied",
    "is_shape_tensor": "shape tensors are not served",
    "allow_ragged_batch": "ragged batching is not served",
    "is_non_linear_format_io": "non-linear tensor formats are not served",
}
# Messages that turn a feature on only with a field set (an empty `reshape { shape: [] }` is a scalar: it counts).
_OFF_WHEN_EMPTY = {"response_cache", "model_transaction_policy", "optimization", "model_metrics"}
_WARNED = {
    "model_warmup": "replaced by this server's warm-up (every batch size up to max_batch_size, on zeros)",
    "response_cache": "responses are not cached; every request runs the model",
    "optimization": "not applied; the execution provider and its options come from the `serve` flags",
    "cc_model_filenames": "not applied; every device loads <version>/model.onnx",
    "metric_tags": "not applied to this server's metrics",
    "model_metrics": "not applied to this server's metrics",
    "runtime": "not applied; onnxruntime runs the model",
    "priority_queue_policy": "not applied; every priority level has the default_queue_policy",
    "timeout_action": "not applied; a request past its timeout is rejected (REJECT)",
    "allow_timeout_override": "not applied; a request's own timeout always applies",
    "rate_limiter": "not applied; instances run without a rate limiter",
}


def unserved_features(config: mc.ModelConfig, parameters: Iterable[str]) -> tuple[list[str], list[str]]:
    """The features `config` sets that this server does not serve, by field path: (refused, warnings), each
    entry `path: why`. A field set to its default is no feature; `parameters` are the keys the format reads."""
    refused, warnings = [], []
    warnings += [f"parameters[{key!r}]: not applied by this server" for key in config.parameters
                 if key not in set(parameters)]
    if config.platform == "ensemble":
        refused.append(f"platform: ensemble: {_REFUSED['ensemble_scheduling']}")
    warnings += [f"model_warmup {w.name!r} (batch_size {w.batch_size}): {_WARNED['model_warmup']}"
                 for w in config.model_warmup]
    _walk(config, "", refused, warnings)
    return refused, warnings


def _walk(message: Message, prefix: str, refused: list[str], warnings: list[str]) -> None:
    served = _SERVED[message.DESCRIPTOR.name]
    for fd, value in message.ListFields():
        path = f"{prefix}{fd.name}"
        if fd.name in served:
            nested = fd.message_type is not None and fd.message_type.name in _SERVED
            if nested and fd.is_repeated:
                for i, item in enumerate(value):
                    _walk(item, f"{path}[{i}].", refused, warnings)
            elif nested:
                _walk(value, f"{path}.", refused, warnings)
        elif fd.name == "model_warmup" or (fd.name in _OFF_WHEN_EMPTY and value.ByteSize() == 0):
            continue  # named above; or switched off (`response_cache { enable: false }`)
        elif fd.name in _REFUSED:
            refused.append(f"{path}: {_REFUSED[fd.name]}")
        else:
            warnings.append(f"{path}: {_WARNED.get(fd.name, 'not applied by this server')}")
