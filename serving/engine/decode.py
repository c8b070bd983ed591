"""The one decode path: what clients send (encoded images, pixel tensors, model-input tensors, from any API)
into the batch's input buffer [B, C, H, W] float32, in [0, 1] for pixels.

Normalisation (mean/std) is inside the exported graph, so the server only decodes, converts colour,
resizes and scales. Runs in the batch worker thread (on the event loop only for a lone caller's small
batches), never in a servicer.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..repository_format import Preprocessing
from .errors import InvalidInput, shown
from .inference import MODEL_INPUT, MODEL_INPUT_BATCH, PIXELS, ImageBatch, Images, InferenceRequest, RawTensor, element_count

# The one dtype table: the tensor dtypes accepted, little-endian, whatever API they came by.
DTYPES = {"uint8": np.dtype("u1"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
UNIT_SCALE = np.float32(1 / 255)  # the one scaling: uint8 pixels -> [0, 1]
# Decompression bombs are refused before decoding; 64 megapixels is far above any classifier input.
MAX_PIXELS = 64 * 1024 * 1024
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def tensor_array(shape: tuple[int, ...], dtype: str, data, what: str = "tensor") -> np.ndarray:
    """The bytes of a tensor as an array (a view, no copy), after the one check every tensor gets: a known
    dtype, positive dimensions, and exactly as many bytes as its shape needs."""
    if dtype not in DTYPES:
        raise InvalidInput(f"{what} dtype {shown(dtype)} is not supported; use one of {', '.join(DTYPES)}")
    if not shape or any(d <= 0 for d in shape):
        raise InvalidInput(f"{what} shape {list(shape)} must have positive dimensions")
    np_type = DTYPES[dtype]
    expected = element_count(shape) * np_type.itemsize
    if len(data) != expected:
        raise InvalidInput(f"{what} data is {len(data)} bytes, but shape {list(shape)} of {dtype} needs {expected}")
    return np.frombuffer(data, np_type).reshape(shape)


def to_unit_range(arr: np.ndarray, out: np.ndarray, finite_only: bool) -> None:
    """Model-input-shaped values ([..., C, H, W]) into `out` as float32 in the model's range: uint8 scaled by
    1/255, floats as sent (float16 widened), in one numpy call that writes straight into the batch buffer."""
    if arr.dtype == np.uint8:
        np.multiply(arr, UNIT_SCALE, out=out, dtype=np.float32)
        return
    if finite_only and not np.isfinite(arr).all():
        raise InvalidInput("float tensor holds NaN or infinite values")
    np.copyto(out, arr, casting="same_kind")


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


def _pixels_at_model_size(arr: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 pixels [H, W] or [H, W, C] -> uint8 [H, W, channels] at the model size (a view when they are)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InvalidInput(f"uint8 tensor shape {list(arr.shape)} is not [H, W] or [H, W, C] with C in 1, 3, 4")
    if pixels_at_model_size(arr.shape, pre):
        return arr
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    return _pil_to_array(Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if mode == "L" else arr), mode), pre)


def decode_images(images: Images, pre: Preprocessing, out: np.ndarray, finite_only: bool = True) -> None:
    """One request's wire images -> rows of the batch buffer `out` ([n, C, H, W] float32 in the model's range).
    Every conversion of an image happens here, once: encoded bytes are decoded, converted and resized with
    Pillow; tensors are checked, laid out as the model wants and scaled, straight into their rows."""
    if isinstance(images, ImageBatch):
        arr = tensor_array(images.shape, images.dtype, images.data, "input")
        if images.layout == MODEL_INPUT_BATCH:
            _check_model_input(arr.shape[1:], pre)
            to_unit_range(arr, out, finite_only)
            return
        if arr.dtype != np.uint8:
            raise InvalidInput(f"a batch of pictures must be uint8, not {images.dtype}")
        if pixels_at_model_size(arr.shape[1:], pre):  # a block of pictures at the model size: one step
            to_unit_range(arr.reshape(-1, pre.height, pre.width, pre.channels).transpose(0, 3, 1, 2), out, True)
            return
        for i, picture in enumerate(arr):
            to_unit_range(_pixels_at_model_size(picture, pre).transpose(2, 0, 1), out[i], True)
        return
    for i, item in enumerate(images):
        if isinstance(item, bytes):
            pixels = _pil_to_array(decode_image(item), pre)
        else:
            arr = tensor_array(item.shape, item.dtype, item.data)
            if item.layout == MODEL_INPUT or arr.dtype != np.uint8:  # float pixels are the model input itself
                _check_model_input(arr.shape, pre)
                to_unit_range(arr, out[i], finite_only)
                continue
            pixels = _pixels_at_model_size(arr, pre)
        to_unit_range(pixels.transpose(2, 0, 1), out[i], finite_only)


def decode_batch(requests: list[InferenceRequest], rows: list[slice], out: np.ndarray,
                 pre: Preprocessing) -> list[InvalidInput | None]:
    """Every request of a batch into its rows of `out`; a request with bad input gets its error (its rows are
    zeros) and the others run as sent. Uint8 pixels already at the model size, the common wire form, are
    joined and converted in one vectorised step for the whole batch."""
    errors: list[InvalidInput | None] = [None] * len(requests)
    if _all_pixels_at_model_size(requests, pre):
        joined = np.frombuffer(b"".join(t.data for req in requests for t in req.images), np.uint8)
        to_unit_range(joined.reshape(-1, pre.height, pre.width, pre.channels).transpose(0, 3, 1, 2), out, True)
        return errors
    for i, (req, sl) in enumerate(zip(requests, rows)):
        try:
            decode_images(req.images, pre, out[sl], req.finite_only)
        except InvalidInput as e:
            errors[i] = e
            out[sl] = 0
    return errors


def _check_model_input(shape: tuple[int, ...], pre: Preprocessing) -> None:
    expected = (pre.channels, pre.height, pre.width)
    if tuple(shape) != expected:
        raise InvalidInput(f"float tensor shape {list(shape)} must be the model input {list(expected)} (C, H, W) "
                           "with values in [0, 1]")


def pixels_at_model_size(shape: tuple[int, ...], pre: Preprocessing) -> bool:
    """Whether uint8 pixels of this shape ([H, W] or [H, W, C]) are at the model size, needing no resize."""
    return tuple(shape) == (pre.height, pre.width, pre.channels) or (
        tuple(shape) == (pre.height, pre.width) and pre.channels == 1)


def _all_pixels_at_model_size(requests: list[InferenceRequest], pre: Preprocessing) -> bool:
    n = pre.height * pre.width * pre.channels
    shapes = set()
    for req in requests:
        if type(req.images) is not list:
            return False
        for t in req.images:
            if type(t) is not RawTensor or t.dtype != "uint8" or t.layout != PIXELS or len(t.data) != n:
                return False
            shapes.add(t.shape)
    return all(pixels_at_model_size(shape, pre) for shape in shapes)


def input_image_uint8(x: np.ndarray) -> np.ndarray:
    """Model input [C, H, W] in [0, 1] -> uint8 [H, W, C] picture, for overlays."""
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
