"""References of the patch ops (image <-> tokens), the semantics of the C++/CUDA ``patchify`` / ``unpatchify``.

Pure data movement: exact in every dtype, so they take no ``upcast``."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C·p·p), tokens row-major over the grid, each flattened in (c, py, px).

    A Linear over a token equals the Conv2d(C, d, p, stride p) patch embedding whose weight is
    reshaped to (d, C·p·p).  With ``ids_keep`` (B, K) only those tokens are returned (B, K, C·p·p).
    """
    B, C, H, W = images.shape
    p = patch_size
    gh, gw = H // p, W // p
    x = images.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
    if ids_keep is not None:
        x = torch.gather(x, 1, ids_keep.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return x


def unpatchify(
    tokens: torch.Tensor,
    patch_size: int,
    channels: int,
    grid: tuple[int, int] | int,
    ids_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, gh·gw, C·p·p) -> (B, C, gh·p, gw·p).

    With ``ids_keep`` (B, K), ``tokens`` is (B, K, C·p·p): token ``k`` of row ``b`` fills grid cell
    ``ids_keep[b, k]`` and every other cell is zero.  The ids must be unique per row (the op
    checks it): then this is both the left inverse of ``patchify(..., ids_keep)`` on the kept
    cells and its exact adjoint (its backward), each image element written once.  With a repeated
    id the two would differ (the adjoint sums the repeats, a scatter keeps one), which is why
    repeats are an error rather than a semantics.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    B = tokens.shape[0]
    p = patch_size
    if ids_keep is not None:
        D = tokens.shape[-1]
        full = tokens.new_zeros((B, gh * gw, D))
        tokens = full.scatter(1, ids_keep.long().unsqueeze(-1).expand(-1, -1, D), tokens)
    x = tokens.reshape(B, gh, gw, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, gh * p, gw * p)
