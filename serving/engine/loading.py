"""Loading one model version from the repository into what runs it: onnxruntime sessions checked against
the config, CAM weights, metadata, warmed up, and the batch execution over them. The server puts a batcher in
front of it (`server/model.py`); a batch job's worker calls it directly (the Ray engine). Also which model
and version a caller means when it names none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..repository_format import (
    CAM_WEIGHTS_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    ConfigError,
    ModelSpec,
    VersionMetadata,
    class_count,
    list_versions,
    read_metadata,
    select_versions,
    version_file,
)
from .errors import ModelNotFound, shown
from .execution import BatchExecution
from .runtime import OrtSessions, RuntimeOptions


def model_names(root: Path) -> list[str]:
    """The models of a repository: its directories that hold a config, sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / CONFIG_FILE).exists())


def only_model(names: list[str], where: str) -> str:
    """The model a caller means when it names none: the only one there is."""
    if len(names) != 1:
        raise ModelNotFound(f"{where} holds {', '.join(names) or 'no models'}; name one")
    return names[0]


def choose_version(spec: ModelSpec, version: int = 0) -> int:
    """`version` if the model has it on disk; 0: the newest its version policy serves."""
    on_disk = list_versions(spec.directory)
    if version:
        if version not in on_disk:
            raise ModelNotFound(f"model {shown(spec.name)} has no version {version} (versions: "
                                f"{', '.join(map(str, on_disk)) or 'none'})")
        return version
    versions = select_versions(spec.config, on_disk)
    if not versions:
        raise ModelNotFound(f"model {shown(spec.name)} has no version directory with a model file")
    return versions[-1]


@dataclass
class LoadedVersion:
    """A version's sessions and batch execution, checked against its config and warmed up: what a server
    puts a batcher in front of, and what a batch job's worker calls directly."""
    execution: BatchExecution
    metadata: VersionMetadata
    cam_unsupported_reason: str  # why the version cannot explain ("" when it can)

    @property
    def sessions(self) -> OrtSessions:
        return self.execution.sessions


def load_execution(spec: ModelSpec, version: int, options: RuntimeOptions | None = None,
                   instances: int | None = None, max_batch_size: int | None = None) -> LoadedVersion:
    """Create sessions (one per instance, the config's count unless given), read CAM weights and
    metadata, check the graph against the config, and warm up for batches up to the config's
    max_batch_size (or the given one, for a caller that forms its own batches)."""
    outputs = [spec.logits_output] + ([spec.features_output] if spec.features_output else [])
    b = spec.batching
    # Every file through version_file: a version directory or file linked to outside the model is refused
    # (ConfigError) before anything is read.
    model_path, cam_path = (version_file(spec.directory, version, f) for f in (MODEL_FILE, CAM_WEIGHTS_FILE))
    metadata = read_metadata(spec.directory, version)
    sessions = OrtSessions(model_path, spec.input_name, outputs, instances or b.instances, options)
    pre = spec.preprocessing
    _check_shapes(sessions, spec)
    cam_weights, cam_unsupported_reason = None, metadata.cam_unsupported_reason
    if spec.features_output and cam_path.exists():
        cam_weights = np.load(cam_path).astype(np.float32)
        cam_unsupported_reason = ""
    elif not cam_unsupported_reason:
        cam_unsupported_reason = "the repository has no CAM weights for this version"
    sessions.warm_up((pre.channels, pre.height, pre.width), max_batch_size or b.max_batch_size)
    return LoadedVersion(BatchExecution(spec, sessions, cam_weights), metadata, cam_unsupported_reason)



def _check_shapes(sessions: OrtSessions, spec: ModelSpec) -> None:
    """Refuse a model file whose graph disagrees with its config (a wrong file in a version directory)."""
    session = sessions.sessions[0]
    inputs = {i.name: i for i in session.get_inputs()}
    if spec.input_name not in inputs:
        raise ConfigError(f"model has no input {spec.input_name!r} (it has {', '.join(inputs)})")
    shape = inputs[spec.input_name].shape
    want = [spec.preprocessing.channels, spec.preprocessing.height, spec.preprocessing.width]
    if len(shape) != 4 or [d if isinstance(d, int) else None for d in shape[1:]] != want:
        raise ConfigError(f"model input shape {shape} does not match the config's [-1, {want}]")
    outputs = {o.name: o for o in session.get_outputs()}
    for name in [spec.logits_output] + ([spec.features_output] if spec.features_output else []):
        if name not in outputs:
            raise ConfigError(f"model has no output {name!r} (it has {', '.join(outputs)})")
    logits = outputs[spec.logits_output].shape[-1]
    if isinstance(logits, int) and class_count(logits) != spec.num_classes:
        raise ConfigError(f"model gives {logits} logits but labels.txt lists {spec.num_classes} classes")
