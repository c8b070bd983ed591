"""One registry for the whole range: `create_model(name, **kwargs)` as in timm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

_REGISTRY: dict[str, ModelEntry] = {}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    builder: Callable[..., nn.Module]
    defaults: dict


def register_model(name: str, family: str, **defaults) -> Callable:
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, family, fn, defaults)
        return fn

    return wrap


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    entry = _REGISTRY[name]
    return entry.builder(**{**entry.defaults, **kwargs})


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    return _REGISTRY[name]
