"""Turning what clients send into the model's input tensor [B, C, H, W] float32 in [0, 1].

Normalisation (mean/std) is inside the exported graph, so the server only decodes, converts colour,
resizes and scales. Runs in the batch worker thread (on the event loop only for a lone caller's small batches).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..repository_format import Preprocessing
from .errors import InvalidInput, shown
from .inference import RawTensor, WireImage

_DTYPES = {"uint8": np.uint8, "float32": np.float32, "float16": np.float16}
# Decompression bombs are refused before decoding; 64 megapixels is far above any classifier input.
MAX_PIXELS = 64 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def tensor_to_array(t: RawTensor) -> np.ndarray:
    if t.dtype not in _DTYPES:
        raise InvalidInput(f"tensor dtype {shown(t.dtype)} is not supported; use one of {', '.join(_DTYPES)}")
    if any(d <= 0 for d in t.shape) or not t.shape:
        raise InvalidInput(f"tensor shape {list(t.shape)} must have positive dimensions")
    dtype = np.dtype(_DTYPES[t.dtype]).newbyteorder("<")
    expected = int(np.prod(t.shape)) * dtype.itemsize
    if len(t.data) != expected:
        raise InvalidInput(f"tensor data is {len(t.data)} bytes, but shape {list(t.shape)} of {t.dtype} "
                           f"needs {expected}")
    return np.frombuffer(t.data, dtype=dtype).reshape(t.shape)


def decode_image(data: bytes) -> Image.Image:
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        # A phone photo is stored sideways with an EXIF orientation tag: turn it upright before anything else,
        # as viewers do (in place: nothing is copied for the images that have no such tag).
        with contextlib.suppress(Exception):  # a malformed EXIF block leaves the image as stored, never INTERNAL
            ImageOps.exif_transpose(img, in_place=True)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        head = data[:8].hex()
        # Pillow's text for an unknown format names its in-memory buffer object: say what it means instead.
        reason = "not a format Pillow reads" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise InvalidInput(f"cannot decode image ({len(data)} bytes, starts with {head}): expected PNG or "
                           f"JPEG ({reason})") from None
    return img


def _pil_to_array(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """Colour conversion and resize as the preprocessing says; returns uint8 [H, W, C]."""
    if img.mode in ("RGBA", "LA", "P") and pre.channels == 3:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert(pre.color_mode)
    if img.size != (pre.width, pre.height):
        img = img.resize((pre.width, pre.height), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).reshape(pre.height, pre.width, pre.channels)


def _pixels_to_array(arr: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] pixels -> uint8 [H, W, channels] at the model size."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InvalidInput(f"uint8 tensor shape {list(arr.shape)} is not [H, W] or [H, W, C] with C in 1, 3, 4")
    if pixels_at_model_size(arr.shape, pre):
        return arr
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    return _pil_to_array(Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if mode == "L" else arr), mode), pre)


def to_model_input(images: list[WireImage | np.ndarray], pre: Preprocessing,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Encoded images, raw tensors or ready arrays -> float32 [B, C, H, W] in [0, 1] (into `out` if given,
    so a whole batch is decoded into one buffer)."""
    expected = (pre.channels, pre.height, pre.width)
    if out is None:
        out = np.empty((len(images), *expected), np.float32)
    if _all_pixels_at_model_size(images, pre):
        # The common wire form (uint8 pixels already at the model size): one join and one vectorised
        # conversion for the whole batch instead of a Python loop over images.
        return pixels_to_model_input(np.frombuffer(b"".join(t.data for t in images), np.uint8), pre, out)
    pixels = np.empty((len(images), pre.height, pre.width, pre.channels), np.uint8)
    is_pixels = np.zeros(len(images), bool)
    for i, item in enumerate(images):
        if isinstance(item, bytes):
            pixels[i] = _pil_to_array(decode_image(item), pre)
            is_pixels[i] = True
            continue
        arr = tensor_to_array(item) if isinstance(item, RawTensor) else item
        if arr.dtype == np.uint8:
            pixels[i] = _pixels_to_array(arr, pre)
            is_pixels[i] = True
        else:
            if arr.shape != expected:
                raise InvalidInput(f"float tensor shape {list(arr.shape)} must be the model input "
                                   f"{list(expected)} (C, H, W) with values in [0, 1]")
            if not np.isfinite(arr).all():
                raise InvalidInput("float tensor holds NaN or infinite values")
            out[i] = arr
    if is_pixels.any():
        # One vectorised conversion for all decoded images: HWC uint8 -> CHW float in [0, 1].
        out[is_pixels] = pixels_to_model_input(pixels[is_pixels], pre)
    return out


def pixels_to_model_input(pixels: np.ndarray, pre: Preprocessing, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 pixels of images at the model size ([N, H, W], [N, H, W, C], or flat) -> float32 [N, C, H, W] in
    [0, 1], in one vectorised step (into `out` if given)."""
    pixels = pixels.reshape(-1, pre.height, pre.width, pre.channels)
    if out is None:
        out = np.empty((len(pixels), pre.channels, pre.height, pre.width), np.float32)
    np.multiply(pixels.transpose(0, 3, 1, 2), np.float32(1 / 255), out=out, dtype=np.float32)
    return out


def pixels_at_model_size(shape: tuple[int, ...], pre: Preprocessing) -> bool:
    """Whether uint8 pixels of this shape ([H, W] or [H, W, C]) are at the model size, needing no resize."""
    return tuple(shape) == (pre.height, pre.width, pre.channels) or (
        tuple(shape) == (pre.height, pre.width) and pre.channels == 1)


def _all_pixels_at_model_size(images: list, pre: Preprocessing) -> bool:
    n = pre.height * pre.width * pre.channels
    return bool(images) and all(type(t) is RawTensor and t.dtype == "uint8" and len(t.data) == n for t in images) \
        and all(pixels_at_model_size(shape, pre) for shape in {t.shape for t in images})


def input_image_uint8(x: np.ndarray) -> np.ndarray:
    """Model input [C, H, W] in [0, 1] -> uint8 [H, W, C] picture, for overlays."""
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
