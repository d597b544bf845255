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


def upscale(images: torch.Tensor, min_side: int) -> torch.Tensor:
    """Nearest-neighbour upscaling by an integer factor until the short side is at least ``min_side``
    (pixels stay visible as blocks; images already that large are returned as they are)."""
    side = min(images.shape[-2:])
    f = max(1, -(-min_side // side)) if side else 1
    return torch.nn.functional.interpolate(images.float(), scale_factor=f, mode="nearest") if f > 1 else images


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 (bundled font, no file needed)
    except TypeError:
        return ImageFont.load_default()


def label_grid(
    grid: np.ndarray,
    cell: tuple[int, int],
    pad: int,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
) -> np.ndarray:
    """Add captions to a :func:`make_grid` array: ``row_labels`` in a left margin (one per grid row,
    centred on it), ``col_labels`` in a top margin (one per column).  ``cell``: the (h, w) of an image."""
    from PIL import ImageDraw

    if not row_labels and not col_labels:
        return grid
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(t: str) -> tuple[int, int]:
        l, t0, r, b = probe.textbbox((0, 0), t, font=font)
        return r - l, b - t0

    left = (max(size(t)[0] for t in row_labels) + 8) if row_labels else 0
    top = (max(size(t)[1] for t in col_labels) + 8) if col_labels else 0
    h, w = grid.shape[:2]
    img = Image.new("RGB", (w + left, h + top), (255, 255, 255))
    img.paste(Image.fromarray(grid), (left, top))
    d = ImageDraw.Draw(img)
    ch, cw = cell
    for i, t in enumerate(row_labels or []):
        tw, th = size(t)
        d.text((4, top + pad + i * (ch + pad) + (ch - th) // 2), t, fill=(0, 0, 0), font=font)
    for j, t in enumerate(col_labels or []):
        while len(t) > 2 and size(t)[0] > cw - 2:  # shorten what does not fit its column
            t = t.rstrip("…")[:-1] + "…"
        tw, th = size(t)
        d.text((left + pad + j * (cw + pad) + max(0, (cw - tw) // 2), 4), t, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def save_grid(
    images: torch.Tensor,
    path: str,
    nrow: int | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    *,
    min_side: int = 64,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
) -> str:
    """Write :func:`make_grid` of ``images`` as a PNG; images smaller than ``min_side`` pixels are
    upscaled (nearest neighbour) so small previews stay legible; optional row / column captions."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images = upscale(images, min_side) if min_side else images
    pad = 2
    grid = make_grid(images, nrow=nrow, pad=pad, value_range=value_range)
    grid = label_grid(grid, tuple(images.shape[-2:]), pad, row_labels, col_labels)
    Image.fromarray(grid).save(path)
    return path


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[0, 1] (B, 3, H, W) -> (B, H, W, 3) uint8 (the ADM ``.npz`` layout)."""
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
