"""The on-disk model repository format, shared by the exporter (training) and the server.

It imports neither torch nor onnxruntime: config.pbtxt (Triton's schema), labels, per-version metadata,
version numbering and staging live here, so that what training writes and what the server reads are
defined once.

Layout of a model repository (Triton's):
    <repo>/<model>/config.pbtxt          platform onnxruntime_onnx, max_batch_size, inputs/outputs,
                                         dynamic_batching, instance_group, version_policy, parameters
    <repo>/<model>/labels.txt            one class name per line (output label_filename)
    <repo>/<model>/<version>/model.onnx
    <repo>/<model>/<version>/metadata.json   metrics, parity error, precision (ours; Triton ignores it)
    <repo>/<model>/<version>/cam_weights.npy W [K, C, h', w'] for class activation maps (ours)

config.pbtxt is parsed in Triton's own schema, so every config Triton accepts parses; a feature this server
does not serve is refused or warned by name (`unserved_features`). `build_config` writes what the exporter needs.

Model-level extras live in `parameters` as strings: `preprocessing` (JSON: channels, height, width, mean,
std), `architecture`, `features_output` (the output holding the last conv maps). The parameter count is
in metadata.json (`parameters`), with the other facts of one version: `VersionMetadata` is that file, read
and written only here.

Every file of a model, those the layout names and those its config names (`label_filename`), is read
only from inside the model's directory: `model_file` resolves the path, symlinks included, and refuses
one that leads out (`../../../etc/passwd`, an absolute path, a link to elsewhere) before anything is read.
Whoever may put a model into a repository can then make the server read nothing but that model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from ..wire.inference import model_config_pb2 as mc
from .features import unserved_features

# The repository bundled with a checkout (the Fashion-MNIST model): what `serve` and the Ray engine use
# when no repository is named.
BUNDLED_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
CONFIG_FILE = "config.pbtxt"
PLATFORM = "onnxruntime_onnx"  # Triton's name for what serves these models
LABELS_FILE = "labels.txt"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
CAM_WEIGHTS_FILE = "cam_weights.npy"
# The `parameters` of config.pbtxt this format reads (any other is named as not applied).
MODEL_PARAMETERS = ("preprocessing", "architecture", "features_output")


class ConfigError(Exception):
    """A model directory whose configuration cannot be used; the message says what to fix."""


@dataclass
class Preprocessing:
    channels: int
    height: int
    width: int
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def color_mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def to_json(self) -> str:
        return json.dumps({"channels": self.channels, "height": self.height, "width": self.width,
                           "mean": self.mean, "std": self.std})


@dataclass
class BatchingOptions:
    """Dynamic batching knobs of one model (config.pbtxt, then server-wide defaults, then CLI)."""
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue_size: int = 1024
    priority_levels: int = 1
    default_priority: int = 1
    default_timeout_us: int = 0
    instances: int = 1
    inline_budget_us: int = 1000  # a lone caller's batches predicted to take less run on the event loop (0 = never)
    combine_requests: bool = True  # False: each request runs alone (config.pbtxt without dynamic_batching)


@dataclass
class ModelSpec:
    name: str
    directory: Path
    config: mc.ModelConfig
    labels: list[str]
    preprocessing: Preprocessing
    input_name: str
    logits_output: str
    features_output: str | None
    architecture: str
    batching: BatchingOptions
    warnings: list[str] = field(default_factory=list)  # config features not applied, by name (see unserved_features)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def output_dims(self, name: str) -> list[int]:
        """An output's dims without the batch, as the config gives them ([] when it gives none)."""
        return next((list(o.dims) for o in self.config.output if o.name == name), [])

    @property
    def logits_shape(self) -> list[int]:
        """The logits output's dims without the batch, from the config ([1] for a binary model)."""
        return self.output_dims(self.logits_output) or [self.num_classes]


@dataclass
class VersionMetadata:
    """`<version>/metadata.json`: the facts of one exported version (what the exporter and the quantiser measured,
    what the server reports). Keys the format does not know are kept in `extra` and written back."""
    architecture: str = ""
    parameters: int = 0
    precision: str = "fp32"
    opset: int = 0
    exported_at: str = ""
    onnx_bytes: int = 0
    parity_max_abs_diff: float | None = None
    parity_data: str = ""  # what the parity check ran on
    metrics: dict[str, Any] = field(default_factory=dict)  # test_acc, test_loss, ... of this version's own file
    cam_unsupported_reason: str = ""  # why the model cannot explain ("" when it can)
    # A reduced-precision version: what it was derived from and measured on.
    derived_from_version: int | None = None
    fp32_test_acc: float | None = None
    accuracy_change_vs_fp32: float | None = None
    measured_on: str = ""
    calibration: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VersionMetadata:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, without the fields that are unset (None or "")."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in data.items() if v is not None and v != ""}, **self.extra}

    @classmethod
    def read(cls, path: Path) -> VersionMetadata:
        """The metadata of a version directory or file (`path`); empty when it has none."""
        path = path / METADATA_FILE if path.is_dir() else path
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(data)

    def write(self, version_dir: Path) -> None:
        (version_dir / METADATA_FILE).write_text(json.dumps(self.to_dict(), indent=1))


def class_count(logit_count: int) -> int:
    """Classes a model with `logit_count` outputs tells apart. One logit is a binary model: it scores the
    positive class (sigmoid), so two classes. Every consumer of logits asks this one function."""
    return 2 if logit_count == 1 else logit_count


def model_file(model_dir: Path, relative: str | Path, what: str) -> Path:
    """The file `relative` of a model, resolved (symlinks followed) and checked to be inside `model_dir`
    (itself resolved, so a repository may link a model's whole directory in). `what` names the field or file
    for the error: a path that leads out is a ConfigError, and the model does not load."""
    root = model_dir.resolve()
    path = (root / relative).resolve()
    if path == root or not path.is_relative_to(root):
        # The target is not named: the message reaches callers (RepositoryIndex), the target is not theirs to know.
        raise ConfigError(f"{model_dir}: {what} {str(relative)!r} leads outside the model directory; "
                          "a model's files (symlinks included) must be inside it")
    return path


def version_file(model_dir: Path, version: int, name: str) -> Path:
    """A file of one version directory (model.onnx, metadata.json, cam_weights.npy), confined like every file."""
    return model_file(model_dir, f"{version}/{name}", f"{version}/{name}")


def read_config(model_dir: Path) -> mc.ModelConfig:
    """config.pbtxt in Triton's schema. A field Triton does not know is an error naming the file, line and
    column, as in Triton."""
    path = model_file(model_dir, CONFIG_FILE, CONFIG_FILE)
    if not path.exists():
        raise ConfigError(f"{path} is missing")
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"{path}:{e.GetLine()}:{e.GetColumn()}: {str(e).split(' : ', 1)[-1]}") from e


def write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    (model_dir / CONFIG_FILE).write_text(text_format.MessageToString(config))


def build_config(name: str, preprocessing: Preprocessing, input_name: str, logits: tuple[str, int],
                 features: tuple[str, list[int]], max_batch_size: int, parameters: dict[str, str]) -> mc.ModelConfig:
    """The config.pbtxt of an exported classifier: one FP32 [C, H, W] input, the logits ([K]) and the last conv
    maps (for CAM), dynamic batching up to `max_batch_size`, the newest version served."""
    pre = preprocessing
    cfg = mc.ModelConfig(name=name, platform=PLATFORM, max_batch_size=max_batch_size)
    cfg.input.add(name=input_name, data_type=mc.TYPE_FP32, format=mc.ModelInput.FORMAT_NCHW,
                  dims=[pre.channels, pre.height, pre.width])
    cfg.output.add(name=logits[0], data_type=mc.TYPE_FP32, dims=[logits[1]], label_filename=LABELS_FILE)
    cfg.output.add(name=features[0], data_type=mc.TYPE_FP32, dims=features[1])
    cfg.dynamic_batching.max_queue_delay_microseconds = 0
    cfg.dynamic_batching.preferred_batch_size.append(max_batch_size)
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_AUTO)
    cfg.version_policy.latest.num_versions = 1
    for key, value in {"preprocessing": pre.to_json(), "features_output": features[0], **parameters}.items():
        cfg.parameters[key].string_value = value
    return cfg


def load_spec(model_dir: Path, defaults: BatchingOptions | None = None, overrides: dict | None = None) -> ModelSpec:
    """Parse a model directory; batching comes from server defaults, then config.pbtxt, then overrides."""
    config = read_config(model_dir)
    name = config.name or model_dir.name
    if config.name and config.name != model_dir.name:
        raise ConfigError(f"{model_dir}: config name {config.name!r} differs from the directory name")
    refused, warnings = unserved_features(config, MODEL_PARAMETERS)
    if config.default_model_filename not in ("", MODEL_FILE):
        refused.append(f"default_model_filename: {config.default_model_filename!r}: a version's model is "
                       f"<version>/{MODEL_FILE}")
    if refused:
        raise ConfigError(f"{model_dir / CONFIG_FILE}: not served here: " + "; ".join(refused))
    if config.platform not in ("", PLATFORM) or config.backend not in ("", "onnxruntime"):
        raise ConfigError(f"{model_dir}: platform {config.platform or config.backend!r} is not onnxruntime_onnx")
    if len(config.input) != 1:
        raise ConfigError(f"{model_dir}: expected exactly one input, found {len(config.input)}")
    params = {k: v.string_value for k, v in config.parameters.items()}
    inp = config.input[0]
    dims = list(inp.dims)
    if "preprocessing" in params:
        pre = Preprocessing(**json.loads(params["preprocessing"]))
    elif len(dims) == 3:
        pre = Preprocessing(channels=int(dims[0]), height=int(dims[1]), width=int(dims[2]))
    else:
        raise ConfigError(f"{model_dir}: input dims {dims} are not [C, H, W] and no preprocessing is given")
    if dims and dims != [pre.channels, pre.height, pre.width]:
        raise ConfigError(f"{model_dir}: input dims {dims} disagree with preprocessing "
                          f"[{pre.channels}, {pre.height}, {pre.width}]")
    features_output = params.get("features_output") or None
    logits = [o for o in config.output if o.name != features_output]
    if not logits:
        raise ConfigError(f"{model_dir}: no logits output")
    logits_output = logits[0]
    labels_path = model_file(model_dir, logits_output.label_filename or LABELS_FILE,
                             f"output {logits_output.name!r} label_filename")
    if labels_path.exists():
        labels = [line.strip() for line in labels_path.read_text().splitlines() if line.strip()]
    else:
        classes = class_count(int(logits_output.dims[-1])) if logits_output.dims else 0
        labels = [str(i) for i in range(classes)]
    batching = _batching_options(config, defaults or BatchingOptions())
    for key, value in (overrides or {}).items():
        setattr(batching, key, value)
    return ModelSpec(name, model_dir, config, labels, pre, inp.name, logits_output.name, features_output,
                     params.get("architecture", ""), batching, warnings)


def _batching_options(config: mc.ModelConfig, defaults: BatchingOptions) -> BatchingOptions:
    opts = BatchingOptions(**vars(defaults))
    opts.preferred_batch_sizes = list(defaults.preferred_batch_sizes)
    if config.max_batch_size > 0:
        opts.max_batch_size = config.max_batch_size
    if config.HasField("dynamic_batching"):
        db = config.dynamic_batching
        opts.max_queue_delay_us = int(db.max_queue_delay_microseconds)
        if db.preferred_batch_size:
            opts.preferred_batch_sizes = sorted(int(s) for s in db.preferred_batch_size)
        if db.priority_levels:
            opts.priority_levels = int(db.priority_levels)
            opts.default_priority = int(db.default_priority_level or (db.priority_levels + 1) // 2)
        if db.default_queue_policy.max_queue_size:
            opts.max_queue_size = int(db.default_queue_policy.max_queue_size)
        if db.default_queue_policy.default_timeout_microseconds:
            opts.default_timeout_us = int(db.default_queue_policy.default_timeout_microseconds)
    elif config.max_batch_size > 0:
        # Without dynamic_batching Triton runs each request as it comes, never two together: keep that meaning.
        opts.max_queue_delay_us = 0
        opts.combine_requests = False
    if config.instance_group:
        opts.instances = max(1, sum(g.count or 1 for g in config.instance_group))
    return opts


def read_metadata(model_dir: Path, version: int) -> VersionMetadata:
    """A served version's metadata.json, confined like every file of the model."""
    return VersionMetadata.read(version_file(model_dir, version, METADATA_FILE))


def list_versions(model_dir: Path) -> list[int]:
    """Version directories holding a model file, oldest first."""
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / MODEL_FILE).exists())


def next_version(model_dir: Path) -> int:
    existing = list_versions(model_dir) if model_dir.exists() else []
    return (existing[-1] + 1) if existing else 1


@contextlib.contextmanager
def staged_version(model_dir: Path, final: Path) -> Iterator[Path]:
    """A path to assemble a version directory in, renamed to `final` when the block succeeds: a polling
    server never sees a half-written version."""
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".export-") as tmp:
        staging = Path(tmp) / "v"
        yield staging
        staging.rename(final)


def select_versions(config: mc.ModelConfig, available: list[int]) -> list[int]:
    """Triton's version policy: latest N (default 1), all, or specific versions."""
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return list(available)
    if which == "specific":
        return [v for v in available if v in set(policy.specific.versions)]
    n = policy.latest.num_versions if which == "latest" and policy.latest.num_versions else 1
    return available[-n:]
