"""The CNN range. Importing this package registers every family."""

from . import alexnet, lenet, linear, resnet, small, vgg  # noqa: F401  (each registers its builders)
from .base import CamUnsupported, GapHead, ImageClassifier, compute_cam
from .registry import create_model, list_models, model_entry, register_model

__all__ = [
    "CamUnsupported", "GapHead", "ImageClassifier", "compute_cam",
    "create_model", "list_models", "model_entry", "register_model",
]
