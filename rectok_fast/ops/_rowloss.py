"""The row-loss chain shared by :mod:`.cosine_align` and :mod:`.kl`'s ``kl_align``.

Both losses are the same chain over (M, D) rows with a per-row statistic: a forward kernel writes
a weighted per-row loss and 3 fp32 stats per row, the backward kernel reads both inputs once more
and scales by ``grad / count``.  The kernels share one argument layout::

    fwd(A, B, W, STATS, ROWLOSS, M, D, *A.strides, *B.strides, *scalars, HAS_WEIGHT, BLOCK_M, BLOCK_D)
    bwd(A, B, W, STATS, SCALE, DA, DB, M, D, *A.strides, *B.strides, *scalars,
        HAS_WEIGHT, GRAD_TARGET, BLOCK_M, BLOCK_D)

so the launchers, fakes, autograd and the flattening of the functionals live here once (the kernels'
shared pieces are in :mod:`rectok_fast.kernels._rows`).  A launcher takes the kernel's name in its
module of :mod:`rectok_fast.kernels` (imported on the first launch: triton is optional until then).
"""

from __future__ import annotations

import torch

from .._backend import kernels, triton_interpret
from ._launch import cdiv, next_power_of_2


def row_tile_config(M: int, D: int, device: torch.device | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for row-wise kernels over (M, D) that loop over D.

    BLOCK_D <= 1024, so wider rows loop over D.  For a GPU target a tile holds ~4096 elements; for
    the CPU interpreter, where each program instance costs about the same whatever its size, tiles
    hold up to 16x more rows.  ``device`` is unused: the choice follows the compile target
    (:func:`rectok_fast._backend.triton_interpret`).
    """
    interp = triton_interpret()
    block_d = min(next_power_of_2(max(D, 1)), 1024)
    budget = 65536 if interp else 4096
    block_m = max(1, min(budget // block_d, next_power_of_2(max(M, 1))))
    num_warps = 4 if block_m * block_d <= 2048 else 8
    return block_m, block_d, num_warps


def mean_count(weight: torch.Tensor | None, M: int, device: torch.device) -> torch.Tensor:
    """Denominator of the mean (0-dim fp32): number of tokens, or the clamped sum of the weights."""
    if weight is None:
        return torch.full((), float(M), dtype=torch.float32, device=device)
    return weight.sum().clamp_min(1.0)


def flatten_rows(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None, grad_target: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(..., D) inputs -> (M, D) views (``b`` detached unless ``grad_target``) and the (M,) fp32 weight."""
    D = a.shape[-1]
    a2, b2 = a.reshape(-1, D), b.reshape(-1, D)
    if not grad_target:
        b2 = b2.detach()
    weight = None if mask is None else mask.detach().reshape(-1).to(torch.float32).contiguous()
    return a2, b2, weight


def _kernel(kernel):
    """A kernel given as ``(module, name)`` in :mod:`rectok_fast.kernels`, imported on first use."""
    if isinstance(kernel, tuple):
        module, name = kernel
        return getattr(kernels(module), name)
    return kernel


def row_loss_fwd(
    kernel,
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor | None,
    scalars: tuple[float, ...],
    n_stats: int = 3,
    tile=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch a row-loss forward kernel: (loss 0-dim fp32 = Σ rowloss / count, stats (M, n_stats) fp32).

    ``tile(M, D) -> dict`` (optional) returns ``BLOCK_M``, ``BLOCK_D``, ``num_warps`` and any extra
    constexprs of the kernel; default: :func:`row_tile_config`.  ``kernel``: ``(module, name)`` in
    :mod:`rectok_fast.kernels` (or the kernel itself)."""
    M, D = a.shape
    stats = torch.empty((M, n_stats), dtype=torch.float32, device=a.device)
    rowloss = torch.empty((M,), dtype=torch.float32, device=a.device)
    if M > 0:
        meta = _tile_meta(tile, M, D, a.device)
        _kernel(kernel)[(cdiv(M, meta["BLOCK_M"]),)](
            a,
            b,
            weight if weight is not None else rowloss,  # dummy pointer when HAS_WEIGHT=False
            stats,
            rowloss,
            M,
            D,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            *scalars,
            HAS_WEIGHT=weight is not None,
            **meta,
        )
    if weight is None:  # one reduction kernel, not sum + count tensor + division; M = 0 gives NaN like the reference
        return rowloss.mean(), stats
    return rowloss.sum() / mean_count(weight, M, a.device), stats


def _tile_meta(tile, M: int, D: int, device: torch.device) -> dict:
    if tile is not None:
        return tile(M, D)
    block_m, block_d, num_warps = row_tile_config(M, D, device)
    return {"BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": num_warps}


def row_loss_bwd(
    kernel,
    grad: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    scalars: tuple[float, ...],
    grad_target: bool,
    tile=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch a row-loss backward kernel: (da (M, D) in a's dtype, db (M, D) or (0,) unless grad_target);
    ``tile`` as in :func:`row_loss_fwd`."""
    M, D = a.shape
    da = torch.empty((M, D), dtype=a.dtype, device=a.device)
    db = torch.empty((M, D) if grad_target else (0,), dtype=b.dtype, device=b.device)
    if M > 0 and D > 0:
        count = float(M) if weight is None else mean_count(weight, M, a.device)  # a Python float: no count tensor
        scale = (grad.float() / count).contiguous()
        meta = _tile_meta(tile, M, D, a.device)
        _kernel(kernel)[(cdiv(M, meta["BLOCK_M"]),)](
            a,
            b,
            weight if weight is not None else stats,  # dummy pointer when HAS_WEIGHT=False
            stats,
            scale,
            da,
            db if grad_target else da,
            M,
            D,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            *scalars,
            HAS_WEIGHT=weight is not None,
            GRAD_TARGET=grad_target,
            **meta,
        )
    return da, db


def row_loss_fwd_fake(a: torch.Tensor, n_stats: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return a.new_empty((), dtype=torch.float32), a.new_empty((a.shape[0], n_stats), dtype=torch.float32)


def row_loss_bwd_fake(a: torch.Tensor, b: torch.Tensor, grad_target: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return a.new_empty(a.shape), b.new_empty(b.shape if grad_target else (0,))


def register_row_loss_autograd(fwd_op, bwd_op) -> None:
    """Autograd for a row-loss op pair ``fwd_op(a, b, weight, scalar) -> (loss, stats)`` /
    ``bwd_op(grad, a, b, weight, stats, scalar, grad_target) -> (da, db)``: saves the inputs and
    the per-row stats, and asks for ``db`` only when ``b`` needs a gradient."""

    def setup_context(ctx, inputs, output):
        a, b, weight, scalar = inputs
        _, stats = output
        ctx.save_for_backward(a, b, weight, stats)
        ctx.scalar = scalar
        ctx.mark_non_differentiable(stats)

    def backward(ctx, grad_loss, grad_stats):
        a, b, weight, stats = ctx.saved_tensors
        grad_target = bool(ctx.needs_input_grad[1])
        da, db = bwd_op(grad_loss, a, b, weight, stats, ctx.scalar, grad_target)
        return da, (db if grad_target else None), None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)
