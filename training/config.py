"""The training run's configuration: one dataclass, filled from a YAML or TOML file and `key=value` overrides.

Every key and value is checked here, before any data loads or model is built: a typo (`epoch=1`) is refused
with the nearest key suggested, a value of the wrong type (`epochs=abc`) or outside its choices
(`optimizer=sgdd`) with what it takes. `python -m training train --help` lists every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .augment import AugmentConfig


class UsageError(Exception):
    """A mistake in what the user asked for (a config key, a value, a missing file): one line, exit code 2."""


@dataclass
class TrainConfig:
    model: str = "small_fmnist"
    model_args: dict = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    verify_checksums: bool = True           # SHA-256 of the official IDX files
    input_size: list[int] | None = None     # default: the dataset's own size
    channels: int | None = None             # default: the dataset's own channels
    val_fraction: float = 0.1
    epochs: int = 15
    batch_size: int = 128                   # per process: the global batch is batch_size x processes
    optimizer: str = "sgd"                  # sgd | adam | adamw
    lr: float = 0.1                         # the peak learning rate; with lr_scaling: linear, the one for 256 images
    lr_scaling: str = "none"                # none | linear: lr x global batch / 256 (Goyal et al., 2017)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"                # cosine | step | onecycle | constant
    warmup_epochs: float = 1.0
    step_size: int = 10                     # epochs between decays, step schedule
    step_gamma: float = 0.1
    loss: str = "cross_entropy"             # cross_entropy | quadratic
    label_smoothing: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    early_stopping: int = 0                 # stop after this many epochs without a better val accuracy
    time_limit_s: float = 0.0               # stop after the epoch that ends past this many seconds; 0 = none
    seed: int = 0
    device: str = "auto"                    # auto (CUDA when torch sees a GPU) | cpu | cuda | cuda:N
    amp: str = "auto"                       # auto (bf16 on CUDA, off on CPU) | bf16 | off
    compile: bool = False                   # torch.compile the training step's model
    compile_backend: str = "inductor"       # torch.compile's backend; aot_eager traces without generating code
    threads: int = 0                        # torch intra-op threads, 0 = torch's default
    eval_batch_size: int = 1000
    out_dir: str = "runs/small_fmnist"
    resume: bool = False
    max_train_samples: int = 0              # 0 = all; for quick runs and tests
    progress: bool = True


# The values a key takes, where they are a fixed set: checked with the other keys, not epochs later.
CHOICES = {
    "optimizer": ("sgd", "adam", "adamw"),
    "lr_scaling": ("none", "linear"),
    "schedule": ("cosine", "step", "onecycle", "constant"),
    "loss": ("cross_entropy", "quadratic"),
    "amp": ("auto", "bf16", "off"),
    "dataset": ("fashion-mnist", "mnist", "cifar10", "folder"),
}
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def load_config(path: str | None, overrides: list[str]) -> TrainConfig:
    """File (YAML or TOML) first, then `key=value` overrides (dotted keys reach into nested sections)."""
    import yaml

    values: dict = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise UsageError(f"--config {path}: {e.strerror or e}") from None
        try:
            if path.endswith(".toml"):
                import tomllib
                values = tomllib.loads(text)
            else:
                values = yaml.safe_load(text) or {}
        except (yaml.YAMLError, ValueError) as e:
            raise UsageError(f"--config {path} does not parse: {e}") from None
        if not isinstance(values, dict):
            raise UsageError(f"--config {path} holds no key: value pairs")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"override {item!r} is not key=value (e.g. epochs=5)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        target = values
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise UsageError(f"override {item!r}: {p} is not a section")
        target[leaf] = value
    return config_from_dict(values)


def config_from_dict(values: dict) -> TrainConfig:
    """The configuration, every key known and every value of its key's type (converted where YAML left a
    string, as it does for `1e-3`)."""
    checked = _checked(TrainConfig, values, "")
    checked["augment"] = AugmentConfig(**_checked(AugmentConfig, values.get("augment") or {}, "augment."))
    return TrainConfig(**checked)


def _checked(cls: type, values: dict, prefix: str) -> dict:
    if not isinstance(values, dict):
        raise UsageError(f"{prefix.rstrip('.')} must be a section of keys, not {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise UsageError(f"unknown config key '{prefix}{key}'{hint} (python -m training train --help lists "
                             f"every key)")
        if key == "augment" and cls is TrainConfig:
            continue  # its own section, checked by its own class
        out[key] = _value(f"{prefix}{key}", value, hints[key])
        if key in CHOICES and out[key] not in CHOICES[key]:
            raise UsageError(f"{prefix}{key}={value!r}: choose one of {', '.join(CHOICES[key])}")
        if key == "device" and cls is TrainConfig and not re.fullmatch(r"auto|cpu|cuda(:\d+)?", out[key]):
            raise UsageError(f"device={value!r}: auto, cpu, cuda or cuda:N")
    if cls is TrainConfig and "model" in out:
        from .models import list_models
        if out["model"] not in list_models():
            close = difflib.get_close_matches(out["model"], list_models(), n=1)
            raise UsageError(f"model={out['model']!r} is not a registered model" +
                             (f"; did you mean {close[0]}?" if close else " (python -m training models lists them)"))
    return out


def _value(key: str, value, hint):
    """`value` as the type `hint` says, or a UsageError that names the key, the value and the type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(key, value, inner)
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "text", list: "a list",
                dict: "a section of keys"}
    target = origin or hint
    try:
        if target is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
        elif target is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            if isinstance(value, str) or (isinstance(value, float) and value.is_integer()):
                return int(value)
        elif target is float and not isinstance(value, bool):
            if isinstance(value, (int, float, str)):
                return float(value)
        elif target is str:
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
        elif target is list and isinstance(value, (list, tuple)):
            return [_value(f"{key}[{i}]", v, args[0]) if args else v for i, v in enumerate(value)]
        elif target is dict and isinstance(value, dict):
            return value
    except ValueError:
        pass
    raise UsageError(f"{key}={value!r}: expected {expected.get(target, getattr(target, '__name__', target))}")


def config_keys() -> list[tuple[str, str, object]]:
    """(key, type, default) of every configuration key, the augmentation section's as augment.<key>."""
    rows = []
    for cls, prefix in ((TrainConfig, ""), (AugmentConfig, "augment.")):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "augment" and cls is TrainConfig:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            rows.append((prefix + f.name, kind, default))
    return rows


def config_keys_help() -> str:
    """The key listing of `train --help`."""
    lines = ["configuration keys (in the --config file, or key=value; choices after the type):"]
    for key, kind, default in config_keys():
        choices = CHOICES.get(key)
        lines.append((f"  {key:<20} {kind:<16} {default!r:<22}" + (f" {' | '.join(choices)}" if choices else "")).rstrip())
    return "\n".join(lines)
