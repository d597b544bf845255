"""Triton kernels for the cosine alignment loss ``relu(1 - cos(pred, target) - margin)``.

Rows are tokens (M = prod of leading dims), columns the feature dim D.  Each program owns a tile of
``BLOCK_M`` rows and loops over D in ``BLOCK_D`` chunks, accumulating in fp32.  The forward writes
3 fp32 stats per row (dot, ||pred||, ||target||) and the weighted per-row loss; the backward reads
pred and target once more and recomputes the gradient of cos from the stats.

NaN and Inf propagate as through the reference: the norm clamps and the relu keep NaN (a NaN
token's loss is NaN, not 0; so is the loss for ``margin=nan``), their gradients pass where torch's
do (``norm >= eps``; relu: unless ``1 - cos - margin <= 0``, so also for NaN), so a NaN row's
gradient is NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rows import load_pair, row_tile, store_row_loss, weighted


@triton.jit
def _clamp_min(x, lo):
    """``torch.clamp_min``: NaN stays NaN (``tl.maximum`` would return ``lo``)."""
    return tl.where(x < lo, lo, x)


@triton.jit
def cosine_align_fwd_kernel(
    P,  # pred: (M, D), any float dtype, strides (stride_pm, stride_pd)
    T,  # target: (M, D), any float dtype, strides (stride_tm, stride_td)
    W,  # weight: (M,) fp32 contiguous (read only when HAS_WEIGHT)
    STATS,  # out stats: (M, 3) fp32 contiguous: dot, ||pred||, ||target||
    ROWLOSS,  # out per-row weighted loss: (M,) fp32 contiguous
    M,
    D,
    stride_pm,
    stride_pd,
    stride_tm,
    stride_td,
    margin,
    eps,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_ok, cols = row_tile(M, BLOCK_M, BLOCK_D)  # (BLOCK_M,), (BLOCK_M,), (BLOCK_D,)
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        msk = row_ok[:, None] & (c < D)[None, :]  # (BLOCK_M, BLOCK_D)
        p, t = load_pair(P, T, rows, c, msk, stride_pm, stride_pd, stride_tm, stride_td)
        dot += tl.sum(p * t, axis=1)
        pp += tl.sum(p * p, axis=1)
        tt += tl.sum(t * t, axis=1)
    pn = tl.sqrt(pp)
    tn = tl.sqrt(tt)
    cos = dot / (_clamp_min(pn, eps) * _clamp_min(tn, eps))
    loss = tl.where(1.0 - cos - margin < 0.0, 0.0, 1.0 - cos - margin)  # relu that keeps NaN
    store_row_loss(ROWLOSS, STATS, W, rows, row_ok, loss, dot, pn, tn, HAS_WEIGHT, 3)


@triton.jit
def cosine_align_bwd_kernel(
    P,  # pred: (M, D), strides (stride_pm, stride_pd)
    T,  # target: (M, D), strides (stride_tm, stride_td)
    W,  # weight: (M,) fp32 contiguous (read only when HAS_WEIGHT)
    STATS,  # stats from the forward: (M, 3) fp32 contiguous
    SCALE,  # 0-dim fp32: grad_loss / count
    DP,  # out dpred: (M, D) contiguous, pred's dtype
    DT,  # out dtarget: (M, D) contiguous, target's dtype (written only when GRAD_TARGET)
    M,
    D,
    stride_pm,
    stride_pd,
    stride_tm,
    stride_td,
    margin,
    eps,
    HAS_WEIGHT: tl.constexpr,
    GRAD_TARGET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_ok, cols = row_tile(M, BLOCK_M, BLOCK_D)  # (BLOCK_M,), (BLOCK_M,), (BLOCK_D,)
    dot = tl.load(STATS + rows * 3, mask=row_ok, other=0.0)
    pn = tl.load(STATS + rows * 3 + 1, mask=row_ok, other=1.0)
    tn = tl.load(STATS + rows * 3 + 2, mask=row_ok, other=1.0)
    pnc = _clamp_min(pn, eps)
    tnc = _clamp_min(tn, eps)
    cos = dot / (pnc * tnc)
    # d loss / d cos = -scale * w  unless relu's input is <= 0 (torch's threshold_backward: so the
    # gradient passes for a NaN input, e.g. margin=nan)
    g = tl.load(SCALE).to(tl.float32)
    active = ~((1.0 - cos - margin) <= 0.0)
    coef = weighted(tl.where(active & row_ok, -g, 0.0), W, rows, row_ok, HAS_WEIGHT)
    inv = 1.0 / (pnc * tnc)
    # norms clamped at eps have zero gradient (clamp_min backward passes where norm >= eps)
    cp = tl.where(pn >= eps, cos / (pnc * pnc), 0.0)
    ct = tl.where(tn >= eps, cos / (tnc * tnc), 0.0)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        msk = row_ok[:, None] & (c < D)[None, :]  # (BLOCK_M, BLOCK_D)
        p, t = load_pair(P, T, rows, c, msk, stride_pm, stride_pd, stride_tm, stride_td)
        dp = coef[:, None] * (t * inv[:, None] - p * cp[:, None])
        tl.store(DP + rows[:, None] * D + c[None, :], dp.to(DP.dtype.element_ty), mask=msk)
        if GRAD_TARGET:
            dt = coef[:, None] * (p * inv[:, None] - t * ct[:, None])
            tl.store(DT + rows[:, None] * D + c[None, :], dt.to(DT.dtype.element_ty), mask=msk)
