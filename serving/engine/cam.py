"""Class activation maps (Zhou et al., 2016) from exported feature maps, in numpy.

CAM_k = sum_c W[k, c] * f[c], upsampled bilinearly (as torch's interpolate with align_corners=False) to
the input size and min-max scaled to [0, 1] per image. W has shape [K, C, h', w'] with h', w' either 1
(GAP + linear head) or the map size (per-pixel linear contributions, e.g. the linear classifier).
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from .decode import input_image_uint8


@lru_cache(maxsize=32)
def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out, in] interpolation matrix matching torch.nn.functional.interpolate(align_corners=False)."""
    m = np.zeros((out_size, in_size), np.float32)
    scale = in_size / out_size
    for i in range(out_size):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(np.floor(src)), in_size - 1)
        hi = min(lo + 1, in_size - 1)
        frac = src - lo
        m[i, lo] += 1 - frac
        m[i, hi] += frac
    return m


def raw_cam(features: np.ndarray, weights: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """[B, C, h, w] features, [K, C, h', w'] weights, [B] classes -> [B, h, w] maps."""
    w = weights[classes]
    if w.shape[2:] == (1, 1):
        return np.einsum("bc,bchw->bhw", w[:, :, 0, 0], features, optimize=True)
    return (w * features).sum(axis=1)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = maps.shape[1:]
    if (h, w) == tuple(size):
        return maps.astype(np.float32, copy=False)
    rows, cols = _bilinear_matrix(size[0], h), _bilinear_matrix(size[1], w)
    return np.einsum("Hh,bhw,Ww->bHW", rows, maps, cols, optimize=True).astype(np.float32)


def normalize(maps: np.ndarray) -> np.ndarray:
    """Per-map min-max scaling to [0, 1]; a constant map becomes all zeros."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)


def class_activation_maps(features: np.ndarray, weights: np.ndarray, classes: np.ndarray,
                          size: tuple[int, int]) -> np.ndarray:
    return normalize(upsample(raw_cam(features, weights, classes), size))


def _jet(v: np.ndarray) -> np.ndarray:
    """The 'jet' colour map: [H, W] in [0, 1] -> uint8 [H, W, 3]."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45, min_side: int = 224) -> bytes:
    """Heatmap over the input picture (uint8 [H, W, C]) as a PNG, upscaled so small inputs stay visible."""
    base = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    blended = (base * (1 - alpha) + _jet(heatmap) * alpha).astype(np.uint8)
    img = Image.fromarray(blended, "RGB")
    scale = max(1, -(-min_side // max(img.size)))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def overlays(inputs: np.ndarray, cams: np.ndarray) -> list[bytes]:
    """The overlay PNG of each image: its model input [n, C, H, W] as a picture under its map [n, H, W]."""
    return [overlay_png(input_image_uint8(x), heat) for x, heat in zip(inputs, cams, strict=True)]
