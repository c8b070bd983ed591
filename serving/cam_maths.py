"""Class activation maps (Zhou et al., 2016, "Learning Deep Features for Discriminative Localization"), in numpy:
the one formula, used by the server's explanations and by training's reference (`training.models.compute_cam`).

CAM_k = sum_c W[k, c] * f[c], upsampled bilinearly (as torch's interpolate with align_corners=False) to the input
size and min-max scaled to [0, 1] per image. W has shape [K, C, h', w'] with h', w' either 1 (GAP + linear head)
or the map size (per-pixel linear contributions, e.g. the linear classifier).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


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
    """[B, C, h, w] features, [K, C, h', w'] weights, [B] classes -> [B, h, w] maps (before upsampling and
    scaling)."""
    w = weights[classes]
    if w.shape[2:] == (1, 1):
        # [B, 1, C] @ [B, C, h*w]: one batched matmul (einsum's path search alone cost more than the maths).
        b, c, h, wd = features.shape
        return np.matmul(w[:, None, :, 0, 0], features.reshape(b, c, h * wd)).reshape(b, h, wd)
    return (w * features).sum(axis=1)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = maps.shape[1:]
    if (h, w) == tuple(size):
        return maps.astype(np.float32, copy=False)
    rows, cols = _bilinear_matrix(size[0], h), _bilinear_matrix(size[1], w)
    return np.matmul(np.matmul(rows, maps.astype(np.float32, copy=False)), cols.T)


def normalize(maps: np.ndarray) -> np.ndarray:
    """Per-map min-max scaling to [0, 1]; a constant map becomes all zeros."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)


def class_activation_maps(features: np.ndarray, weights: np.ndarray, classes: np.ndarray,
                          size: tuple[int, int]) -> np.ndarray:
    """[B, H, W] maps in [0, 1] at the input size `size`: what the server answers an Explain with."""
    return normalize(upsample(raw_cam(features, weights, classes), size))
