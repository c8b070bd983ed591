"""The repository format without a server: Triton-style config.pbtxt texts parse in Triton's schema, what the
server does not serve is refused or warned by name, bad configs name their file and line, and metadata.json is
one type."""

import json
from pathlib import Path

import pytest

from serving.repository_format import (
    BUNDLED_REPOSITORY,
    ConfigError,
    Preprocessing,
    VersionMetadata,
    build_config,
    load_spec,
    read_metadata,
    write_config,
)

BASE = """name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "input"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 1, 28, 28 ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ 10 ]
  }
]
"""


def model_dir(tmp_path: Path, text: str) -> Path:
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "config.pbtxt").write_text(text)
    return directory


# -- the three configs the format used to break on ------------------------------------------------------------
def test_model_warmup_parses_and_is_replaced_by_our_warm_up(tmp_path):
    spec = load_spec(model_dir(tmp_path, BASE + 'model_warmup [ { name: "w" batch_size: 1 } ]\n'))
    assert spec.config.model_warmup[0].name == "w"
    (warning,) = spec.warnings
    assert warning.startswith("model_warmup 'w' (batch_size 1): replaced by this server's warm-up")


def test_an_ensemble_is_refused_by_name_not_a_parse_error(tmp_path):
    text = """name: "m"
platform: "ensemble"
max_batch_size: 8
input [ { name: "IMAGE" data_type: TYPE_UINT8 dims: [ -1 ] } ]
output [ { name: "CLASSIFICATION" data_type: TYPE_FP32 dims: [ 10 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "preprocess"
      model_version: -1
      input_map { key: "RAW" value: "IMAGE" }
      output_map { key: "PIXELS" value: "pixels" }
    },
    {
      model_name: "m_onnx"
      model_version: -1
      input_map { key: "input" value: "pixels" }
      output_map { key: "logits" value: "CLASSIFICATION" }
    }
  ]
}
"""
    with pytest.raises(ConfigError) as e:
        load_spec(model_dir(tmp_path, text))
    message = str(e.value)
    assert "config.pbtxt: not served here" in message
    assert "platform: ensemble" in message and "ensemble_scheduling: ensembles" in message


def test_response_cache_is_warned_and_sequence_batching_refused(tmp_path):
    cached = load_spec(model_dir(tmp_path, BASE + "response_cache { enable: true }\n"))
    assert cached.warnings == ["response_cache: responses are not cached; every request runs the model"]
    (tmp_path / "m" / "config.pbtxt").write_text(BASE + """sequence_batching {
  max_sequence_idle_microseconds: 5000000
  control_input [
    {
      name: "START"
      control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ]
    }
  ]
  oldest { max_candidate_sequences: 4 }
}
""")
    with pytest.raises(ConfigError, match=r"sequence_batching: stateful sequences .* are not kept"):
        load_spec(tmp_path / "m")


# -- more of what Triton accepts ------------------------------------------------------------------------------
TRITON_STYLE = """name: "m"
backend: "onnxruntime"
max_batch_size: 16
input [
  {
    name: "input"
    data_type: TYPE_FP32
    dims: [ 1, 28, 28 ]
  }
]
output [
  {
    name: "logits"
    data_type: TYPE_FP32
    dims: [ 10 ]
    label_filename: "labels.txt"
  }
]
version_policy: { latest: { num_versions: 2 } }
instance_group [
  {
    count: 2
    kind: KIND_GPU
    gpus: [ 0 ]
    rate_limiter { resources [ { name: "R1" count: 4 } ] priority: 2 }
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  preserve_ordering: true
  priority_levels: 2
  default_queue_policy { max_queue_size: 32 default_timeout_microseconds: 500000 allow_timeout_override: true }
  priority_queue_policy { key: 1 value: { max_queue_size: 8 } }
}
optimization {
  execution_accelerators {
    gpu_execution_accelerator : [ {
      name : "tensorrt"
      parameters { key: "precision_mode" value: "FP16" }
      parameters { key: "max_workspace_size_bytes" value: "1073741824" }
    } ]
  }
  input_pinned_memory { enable: true }
}
model_warmup [
  {
    name: "zeros"
    batch_size: 8
    inputs { key: "input" value: { data_type: TYPE_FP32 dims: [ 1, 28, 28 ] zero_data: true } }
  }
]
response_cache { enable: false }
model_transaction_policy { decoupled: false }
metric_tags { key: "team" value: "vision" }
parameters { key: "architecture" value: { string_value: "small_fmnist" } }
parameters { key: "intra_op_thread_count" value: { string_value: "4" } }
"""


def test_a_full_triton_config_serves_with_every_unapplied_knob_named(tmp_path):
    spec = load_spec(model_dir(tmp_path, TRITON_STYLE))
    b = spec.batching
    assert (b.max_batch_size, b.preferred_batch_sizes, b.max_queue_delay_us) == (16, [4, 8], 100)
    assert (b.instances, b.priority_levels, b.max_queue_size, b.default_timeout_us) == (2, 2, 32, 500000)
    assert spec.architecture == "small_fmnist"
    named = [w.split(":")[0] for w in spec.warnings]
    # Switched-off features (response_cache, decoupled false) are no features; preserve_ordering holds anyway.
    assert named == ["parameters['intra_op_thread_count']", "model_warmup 'zeros' (batch_size 8)",
                     "instance_group[0].rate_limiter", "metric_tags",
                     "dynamic_batching.default_queue_policy.allow_timeout_override",
                     "dynamic_batching.priority_queue_policy", "optimization"]


@pytest.mark.parametrize(("extra", "refused"), [
    ('batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "N" data_type: TYPE_FP32 source_input: "input" } ]',
     "batch_input"),
    ("model_transaction_policy { decoupled: true }", "model_transaction_policy: decoupled models"),
    ('model_operations { op_library_filename: "libcustom.so" }', "model_operations"),
    ('model_repository_agents { agents [ { name: "checksum" } ] }', "model_repository_agents"),
    ('default_model_filename: "other.onnx"', "default_model_filename: 'other.onnx'"),
])
def test_features_that_would_make_answers_wrong_are_refused(tmp_path, extra, refused):
    with pytest.raises(ConfigError, match="not served here: " + refused):
        load_spec(model_dir(tmp_path, BASE + extra + "\n"))


def test_a_reshape_is_refused_even_to_a_scalar(tmp_path):
    text = BASE.replace('    name: "logits"\n', '    name: "logits"\n    reshape: { shape: [ ] }\n')
    with pytest.raises(ConfigError, match=r"output\[0\]\.reshape: tensor reshapes are not applied"):
        load_spec(model_dir(tmp_path, text))


def test_a_bad_config_names_its_file_line_and_column(tmp_path):
    directory = model_dir(tmp_path, BASE.replace("max_batch_size: 8", "max_batch_sise: 8"))
    with pytest.raises(ConfigError) as e:
        load_spec(directory)
    assert str(e.value).startswith(f"{directory / 'config.pbtxt'}:3:1: ")
    assert "max_batch_sise" in str(e.value)
    (directory / "config.pbtxt").write_text(BASE + "dynamic_batching {\n  max_queue_delay_microseconds: soon\n}\n")
    with pytest.raises(ConfigError, match=r"config\.pbtxt:20:\d+: .*max_queue_delay_microseconds"):
        load_spec(directory)


# -- the exporter's config and metadata.json ------------------------------------------------------------------
def test_build_config_reads_back_as_the_spec_it_describes(tmp_path):
    pre = Preprocessing(1, 28, 28, [0.28], [0.35])
    directory = tmp_path / "m"
    directory.mkdir()
    write_config(directory, build_config("m", pre, "input", ("logits", 10), ("features", [64, 7, 7]), 32,
                                         {"architecture": "small_fmnist"}))
    spec = load_spec(directory)
    assert (spec.input_name, spec.logits_output, spec.features_output) == ("input", "logits", "features")
    assert spec.preprocessing == pre and spec.architecture == "small_fmnist" and spec.warnings == []
    assert spec.batching.max_batch_size == 32 and spec.batching.preferred_batch_sizes == [32]
    assert spec.output_dims("features") == [64, 7, 7] and spec.labels == [str(i) for i in range(10)]


def test_version_metadata_round_trips_and_keeps_unknown_keys(tmp_path):
    bundled = read_metadata(BUNDLED_REPOSITORY / "fashion_mnist", 1)
    assert bundled.architecture == "small_fmnist" and bundled.metrics["test_acc"] == 0.9274
    assert bundled.cam_unsupported_reason == "" and bundled.derived_from_version is None
    version = tmp_path / "1"
    version.mkdir()
    (version / "metadata.json").write_text(json.dumps({"precision": "fp16", "derived_from_version": 1,
                                                       "cam_unsupported_reason": "no GAP head", "note": "kept"}))
    meta = VersionMetadata.read(version)
    assert (meta.precision, meta.derived_from_version, meta.cam_unsupported_reason) == ("fp16", 1, "no GAP head")
    assert meta.extra == {"note": "kept"}
    meta.onnx_bytes = 123
    meta.write(version)
    written = json.loads((version / "metadata.json").read_text())
    assert written == {"precision": "fp16", "derived_from_version": 1, "cam_unsupported_reason": "no GAP head",
                       "note": "kept", "parameters": 0, "opset": 0, "onnx_bytes": 123, "metrics": {}}
    assert VersionMetadata.read(tmp_path / "2") == VersionMetadata()  # a version without metadata
    (version / "metadata.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        VersionMetadata.read(version)
