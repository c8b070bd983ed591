"""The typed request and result that travel between the APIs, the batcher and a model's batch execution.

A wire message is decoded into one `InferenceRequest` by its servicer, once; the batcher queues it as it
is; the execution decodes its images into the batch's float32 buffer and answers an `InferenceResult`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

MAX_IMAGES_PER_REQUEST = 4096


class RawTensor(NamedTuple):
    """A tensor as it came over the wire: shape, dtype name and little-endian bytes. (A NamedTuple: one
    is built per image on the request path, where a frozen dataclass costs several times more.)"""
    shape: tuple[int, ...]
    dtype: str
    data: bytes


WireImage = bytes | RawTensor  # encoded PNG/JPEG bytes, or pixels/model input as a raw tensor


@dataclass
class InferenceRequest:
    """One caller's images (wire images, or a ready float32 array [n, C, H, W]) and what to compute."""
    images: list[WireImage] | np.ndarray
    cam: bool = False
    target_class: int | None = None   # the class a CAM explains; None: each image's predicted class
    keep_inputs: bool = False         # return the model inputs too (for overlays)
    features: bool = False            # return the feature maps (the model's `features` output)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, s: slice) -> InferenceRequest:
        return InferenceRequest(self.images[s], self.cam, self.target_class, self.keep_inputs, self.features)


@dataclass
class InferenceResult:
    logits: np.ndarray                              # [n, K] (K = 1 for a binary model)
    probabilities: np.ndarray                       # [n, classes]
    ranking: np.ndarray                             # [n, classes] class indices, most probable first
    ranked_probabilities: np.ndarray                # [n, classes] probabilities in ranking order
    cams: np.ndarray | None = None                  # [n, H, W] in [0, 1]
    target_classes: np.ndarray | None = None        # [n] the class each CAM explains
    inputs: np.ndarray | None = None                # [n, C, H, W]
    features: np.ndarray | None = None              # [n, C', h, w]

    @staticmethod
    def concat(parts: list[InferenceResult]) -> InferenceResult:
        def cat(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)
        return InferenceResult(*(cat(name) for name in InferenceResult.__dataclass_fields__))
