"""The typed request and result that travel between the APIs, the batcher and a model's batch execution.

A servicer turns a wire message into one `InferenceRequest` of wire-level images, once, and does no numeric
work: encoded image bytes, or tensors as bytes with their dtype, shape and layout. The batcher queues the
request as it is. The batch execution converts every image once, straight into the batch's float32 buffer
(`decode.py`: the one dtype table, the one scaling, the one check of every tensor), and answers an
`InferenceResult`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import InvalidInput

MAX_IMAGES_PER_REQUEST = 4096

# Tensor layouts: one image is "HWC" (pixels: [H, W] or [H, W, C], as pictures are stored) or "CHW" (the model
# input itself); a batch of images in one buffer is "NHWC" or "NCHW".
PIXELS, MODEL_INPUT, PIXELS_BATCH, MODEL_INPUT_BATCH = "HWC", "CHW", "NHWC", "NCHW"


class RawTensor(NamedTuple):
    """One image as a tensor came over the wire: shape, dtype name ("uint8", "float16", "float32"),
    little-endian bytes and layout. Nothing is checked or converted here: `decode.py` does both, in the batch
    worker. (A NamedTuple: one is built per image on the request path, where a frozen dataclass costs several
    times more.)"""
    shape: tuple[int, ...]
    dtype: str
    data: bytes | memoryview
    layout: str = PIXELS


class ImageBatch:
    """N images in one buffer, as a KServe tensor [N, C, H, W] or a batch job's block of pixels [N, H, W, C]
    arrives: the request keeps the bytes, and slicing (the batcher splitting a large request) takes a view."""
    __slots__ = ("shape", "dtype", "data", "layout")

    def __init__(self, shape: tuple[int, ...], dtype: str, data: bytes | memoryview | np.ndarray, layout: str):
        self.shape, self.dtype, self.layout = tuple(shape), dtype, layout
        self.data = memoryview(data).cast("B") if not isinstance(data, bytes) else data

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, s: slice) -> ImageBatch:
        start, stop, _ = s.indices(len(self))
        per_image = len(self.data) // len(self) if len(self) else 0
        rows = (stop - start, *self.shape[1:])
        return ImageBatch(rows, self.dtype, memoryview(self.data)[start * per_image:stop * per_image], self.layout)


WireImage = bytes | RawTensor  # encoded PNG/JPEG bytes, or one image's tensor
Images = list[WireImage] | ImageBatch


@dataclass
class InferenceRequest:
    """One caller's images, as they came over the wire, and what to compute. The number of images is checked
    here, for every API: at least one, at most MAX_IMAGES_PER_REQUEST."""
    images: Images
    cam: bool = False
    target_class: int | None = None   # the class a CAM explains; None: each image's predicted class
    keep_inputs: bool = False         # return the model inputs too (for overlays)
    features: bool = False            # return the feature maps (the model's `features` output)
    # Whether float inputs holding NaN or infinities are refused. KServe passes them through as Triton does
    # (perf_analyzer's random bytes hold some; the answer is then NaN, never a guess).
    finite_only: bool = True

    def __post_init__(self) -> None:
        n = len(self.images)
        if not 0 < n <= MAX_IMAGES_PER_REQUEST:
            raise InvalidInput("request holds no images" if not n else
                               f"{n} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, s: slice) -> InferenceRequest:
        return InferenceRequest(self.images[s], self.cam, self.target_class, self.keep_inputs, self.features,
                                self.finite_only)


def element_count(shape: tuple[int, ...] | list[int]) -> int:
    """The number of elements of a shape, exact (numpy's product could overflow on a hostile shape)."""
    return math.prod(shape)


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
