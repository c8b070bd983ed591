"""Class activation maps as pictures: each map over its input image, as a PNG. The maps themselves come from
the one CAM formula, `serving.cam_maths` (shared with training)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .decode import input_image_uint8


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
