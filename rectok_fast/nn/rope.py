"""The two 2D RoPE tables of docs/method.md and the adjacent-pair rotation they are applied with.

* :func:`rectok_rope_table` — the tokenizer's table (method §1): geometric frequencies from 7 down to
  7e-4 over normalised [0, 1] coordinates, ``F = [f, f]`` (not each frequency repeated), row part in
  the first half of the head dim and column part in the second.
* :func:`eva_rope_table` — the DiT^DH (EVA-style) table (method §4): ``ω_k = 10000^(-2k/h)``, integer
  positions, each frequency repeated for an adjacent pair.

Both are applied by :func:`apply_rope`: ``x·cos + rot(x)·sin`` with ``rot(x0, x1) = (-x1, x0)`` on
adjacent pairs.  Tables are built once per model (buffers), in fp32, so none of this is on a hot path.
"""

from __future__ import annotations

import torch


def rectok_rope_table(
    head_dim: int,
    grid_h: int,
    grid_w: int | None = None,
    *,
    num_special: int = 0,
    max_freq: float = 7.0,
    min_freq: float = 7e-4,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The tokenizer's 2D RoPE table, (num_special + grid_h·grid_w, 2·head_dim) = ``[cos, sin]``.

    For ``q = head_dim/4``: ``f_j = max_freq·(max_freq/min_freq)^(-j/(q-1))``, ``F = [f, f]``; the
    angle of the token at (r, c) is ``[2π·u·F, 2π·v·F]`` with ``u = r/(grid_h-1)``, ``v = c/(grid_w-1)``
    (``linspace(0, 1)``); special tokens (CLS / registers), placed first, get angle 0.  Computed the
    same way as the original implementation (exponent by ``linspace``) so the fp32 table matches it
    bit for bit.
    """
    if head_dim % 4:
        raise ValueError(f"rectok_rope_table: head_dim must be a multiple of 4, got {head_dim}")
    grid_w = grid_h if grid_w is None else grid_w
    q = head_dim // 4
    f = max_freq * (max_freq / min_freq) ** torch.linspace(0, -1, q, device=device, dtype=dtype)
    f = torch.cat([f, f])  # (D/2,)
    freqs = torch.zeros(2, head_dim, device=device, dtype=dtype)
    freqs[0, : head_dim // 2] = f  # row coordinate -> first half
    freqs[1, head_dim // 2 :] = f  # column coordinate -> second half
    freqs = freqs * 2 * torch.pi
    u = torch.linspace(0, 1, grid_h, device=device, dtype=dtype)
    v = torch.linspace(0, 1, grid_w, device=device, dtype=dtype)
    coords = torch.cartesian_prod(u, v)  # (N, 2), row-major
    angle = coords @ freqs  # (N, D)
    if num_special:
        angle = torch.cat([angle.new_zeros(num_special, head_dim), angle], dim=0)
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


def eva_rope_table(
    head_dim: int,
    grid: int,
    *,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DiT^DH (EVA-style) 2D RoPE: ``(cos, sin)``, each (grid², head_dim).

    ``h = head_dim/2``, ``ω_k = theta^(-2k/h)`` for ``k < h/2``, positions ``0..grid-1``, each
    frequency repeated twice (adjacent pairs); the first ``h`` entries carry the row position, the
    last ``h`` the column position; tokens row-major.
    """
    if head_dim % 4:
        raise ValueError(f"eva_rope_table: head_dim must be a multiple of 4, got {head_dim}")
    h = head_dim // 2
    omega = theta ** (-torch.arange(0, h, 2, device=device, dtype=torch.float64)[: h // 2] / h)  # (h/2,)
    pos = torch.arange(grid, device=device, dtype=torch.float64)
    ang = (pos[:, None] * omega[None, :]).repeat_interleave(2, dim=-1)  # (g, h)
    rows = ang[:, None, :].expand(grid, grid, h)
    cols = ang[None, :, :].expand(grid, grid, h)
    full = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return full.cos().to(dtype), full.sin().to(dtype)


def split_table(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[cos, sin]`` (..., 2D) -> ``(cos, sin)`` each (..., D)."""
    return table.chunk(2, dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Adjacent-pair rotation ``(x0, x1) -> (-x1, x0)`` over the last dim."""
    x = x.unflatten(-1, (-1, 2))
    x0, x1 = x.unbind(-1)
    return torch.stack((-x1, x0), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rot(x)·sin``; x (B, H, N, D), cos/sin broadcastable to it (e.g. (B|1, 1, N, D))."""
    return x * cos + rotate_pairs(x) * sin
