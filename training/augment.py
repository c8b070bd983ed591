"""Batch-wise input conversion and augmentation on tensors (no per-image Python loops).

Both run on whatever device the batch is on: the training loop keeps the uint8 training set on the GPU and
converts and augments each batch there, so no step waits for the host. Random numbers come from a generator
on the batch's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def to_model_input(images: np.ndarray | torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, channels, *size] in [0, 1] (bilinear resize, gray<->RGB).

    A tensor stays on its device; a numpy array becomes a CPU tensor.
    """
    pixels = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] != channels:
        if channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma, as Pillow's convert("L")
            luma = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            x = (x * luma).sum(1, keepdim=True)
        else:
            raise ValueError(f"cannot convert {x.shape[1]} channels to {channels}")
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous()


@dataclass
class AugmentConfig:
    crop_padding: int = 0       # random crop after zero padding by this many pixels
    hflip: bool = False
    translate: float = 0.0      # max fraction of the size, random affine
    rotate: float = 0.0         # max degrees, random affine
    erasing: float = 0.0        # probability of random erasing (Zhong et al., 2017)

    @property
    def active(self) -> bool:
        return bool(self.crop_padding or self.hflip or self.translate or self.rotate or self.erasing)


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Augment a float batch [N, C, H, W] on its own device; `gen` must live on that device too."""
    n, _, h, w = x.shape
    dev = x.device
    if cfg.crop_padding:
        p = cfg.crop_padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=dev)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen, device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * p)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w, device=dev)[None])[:, None, None, :].expand(n, x.shape[1], h, w)
        x = x.gather(3, cols)
    if cfg.hflip:
        flip = torch.rand(n, generator=gen, device=dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if cfg.translate or cfg.rotate:
        angle = (torch.rand(n, generator=gen, device=dev) * 2 - 1) * math.radians(cfg.rotate)
        shift = (torch.rand(n, 2, generator=gen, device=dev) * 2 - 1) * cfg.translate * 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    if cfg.erasing:
        # One rectangle per chosen image, 2%-20% of the area, aspect ratio in [0.3, 3.3], filled with noise.
        chosen = torch.rand(n, generator=gen, device=dev) < cfg.erasing
        area = (torch.rand(n, generator=gen, device=dev) * 0.18 + 0.02) * h * w
        ratio = torch.exp(torch.empty(n, device=dev).uniform_(math.log(0.3), math.log(3.3), generator=gen))
        eh = (area * ratio).sqrt().clamp(1, h).long()
        ew = (area / ratio).sqrt().clamp(1, w).long()
        y0 = (torch.rand(n, generator=gen, device=dev) * (h - eh + 1)).long()
        x0 = (torch.rand(n, generator=gen, device=dev) * (w - ew + 1)).long()
        ys, xs = torch.arange(h, device=dev)[None], torch.arange(w, device=dev)[None]
        mask = ((ys >= y0[:, None]) & (ys < (y0 + eh)[:, None]))[:, :, None] & \
               ((xs >= x0[:, None]) & (xs < (x0 + ew)[:, None]))[:, None, :]
        mask = (mask & chosen[:, None, None])[:, None]
        x = torch.where(mask, torch.rand(x.shape, generator=gen, device=dev), x)
    return x
