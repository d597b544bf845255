"""Image grids written as PNG (no torchvision needed)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image


def make_grid(
    images: torch.Tensor, nrow: int | None = None, pad: int = 2, value_range: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """(B, 3, H, W) images in ``value_range`` -> one (H', W', 3) uint8 array, ``nrow`` images per row."""
    x = images.detach().float().cpu()
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    b, c, h, w = x.shape
    if c == 1:
        x = x.expand(b, 3, h, w)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
    ncol = int(math.ceil(b / nrow))
    grid = torch.ones(3, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(b):
        r, cc = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + cc * (w + pad) : pad + cc * (w + pad) + w] = x[
            i, :3
        ]
    return (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def save_grid(
    images: torch.Tensor, path: str, nrow: int | None = None, value_range: tuple[float, float] = (0.0, 1.0)
) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(make_grid(images, nrow=nrow, value_range=value_range)).save(path)
    return path


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[0, 1] (B, 3, H, W) -> (B, H, W, 3) uint8 (the ADM ``.npz`` layout)."""
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
