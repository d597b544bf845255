"""Triton kernels for the DiT velocity flow-matching input ``x_t`` and loss (SPEC §4) with in-kernel x0.

``x1`` of any shape (B, ...) is viewed as (B, M); element ``e = b·M + m`` (row-major index of the
logical tensor) draws ``x0[e] = eps_a(seed, e + E_OFF)`` (``E_OFF = sample_offset·M``, int64: the
counter of global sample ``b + sample_offset``) from the Philox stream documented in
:mod:`rectok_fast.kernels.posterior_flow`, so ``flow_matching_xt`` and ``flow_matching_loss`` called
with the same seed see the same x0, and the backward regenerates it.  One program handles a
BLOCK-wide chunk of one sample's row; per-sample reductions (dL/dt, the squared error) are one fp32
partial per program in a (B, P) buffer summed by the launcher (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .posterior_flow import philox_normal


@triton.jit
def _row(pid0, pid1, M, BLOCK: tl.constexpr):
    m = pid1 * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # (BLOCK,)
    ok = m < M
    e = pid0 * M + m  # (BLOCK,) logical element index
    return m, ok, e


@triton.jit
def _x0(SEED, X0, e, E_OFF, ok, HAS_NOISE: tl.constexpr, ACC: tl.constexpr):
    if HAS_NOISE:
        x0 = tl.load(X0 + e, mask=ok, other=0.0).to(ACC)
    else:
        x0 = philox_normal(tl.load(SEED), e + E_OFF).to(ACC)
    return x0


@triton.jit
def _x1_x0(X1, SEED, X0, b, m, e, E_OFF, ok, stride_xb, stride_xm, HAS_NOISE: tl.constexpr, ACC: tl.constexpr):
    """(x1, x0) of the BLOCK elements ``e`` of row ``b``, both in ACC (x0 loaded or regenerated)."""
    x1 = tl.load(X1 + b * stride_xb + m * stride_xm, mask=ok, other=0.0).to(ACC)
    return x1, _x0(SEED, X0, e, E_OFF, ok, HAS_NOISE, ACC)


@triton.jit
def _residual(
    PRED,
    X1,
    SEED,
    X0,
    b,
    m,
    e,
    E_OFF,
    ok,
    stride_pb,
    stride_pm,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
):
    """``pred − (x1 − x0)`` in ACC for the BLOCK elements ``e`` of row ``b``."""
    p = tl.load(PRED + b * stride_pb + m * stride_pm, mask=ok, other=0.0).to(ACC)
    x1, x0 = _x1_x0(X1, SEED, X0, b, m, e, E_OFF, ok, stride_xb, stride_xm, HAS_NOISE, ACC)
    return p - (x1 - x0)


@triton.jit
def flow_xt_fwd_kernel(
    X1,  # x1: (B, M), strides (stride_xb, stride_xm)
    T,  # t: (B,) contiguous
    SEED,  # seed: (1,) int64 (read when not HAS_NOISE)
    X0,  # x0: (B, M) contiguous (read when HAS_NOISE)
    XT,  # out: (B, M) contiguous, dtype of x1
    M,
    E_OFF,  # int64 Philox counter offset: sample_offset·M
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1).to(tl.int64)
    m, ok, e = _row(b, pid1, M, BLOCK)
    x1, x0 = _x1_x0(X1, SEED, X0, b, m, e, E_OFF, ok, stride_xb, stride_xm, HAS_NOISE, ACC)
    tt = tl.load(T + b).to(ACC)
    xt = tt * x1 + (1.0 - tt) * x0
    tl.store(XT + e, xt.to(XT.dtype.element_ty), mask=ok)


@triton.jit
def flow_xt_bwd_kernel(
    GRAD,  # grad of x_t: (B, M) contiguous
    X1,  # x1: (B, M), strides (stride_xb, stride_xm)
    T,  # t: (B,) contiguous
    SEED,  # seed: (1,) int64 (read when not HAS_NOISE)
    X0,  # x0: (B, M) contiguous (read when HAS_NOISE)
    DX1,  # out: (B, M) contiguous, dtype of x1
    DT_PART,  # out: (B, P) fp32 contiguous, P = num_programs(1)
    M,
    E_OFF,  # int64 Philox counter offset: sample_offset·M
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1).to(tl.int64)
    m, ok, e = _row(b, pid1, M, BLOCK)
    g = tl.load(GRAD + e, mask=ok, other=0.0).to(ACC)
    x1, x0 = _x1_x0(X1, SEED, X0, b, m, e, E_OFF, ok, stride_xb, stride_xm, HAS_NOISE, ACC)
    tt = tl.load(T + b).to(ACC)
    tl.store(DX1 + e, (tt * g).to(DX1.dtype.element_ty), mask=ok)
    dt = tl.where(ok, g * (x1 - x0), 0.0).to(tl.float32)  # dx_t/dt = x1 − x0
    tl.store(DT_PART + b * tl.num_programs(1) + pid1, tl.sum(dt, axis=0))


@triton.jit
def flow_loss_fwd_kernel(
    PRED,  # pred: (B, M), strides (stride_pb, stride_pm)
    X1,  # x1: (B, M), strides (stride_xb, stride_xm)
    SEED,  # seed: (1,) int64 (read when not HAS_NOISE)
    X0,  # x0: (B, M) contiguous (read when HAS_NOISE)
    PART,  # out: (B, P) fp32 contiguous, partial sums of (pred − (x1 − x0))²
    M,
    E_OFF,  # int64 Philox counter offset: sample_offset·M
    stride_pb,
    stride_pm,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1).to(tl.int64)
    m, ok, e = _row(b, pid1, M, BLOCK)
    d = _residual(PRED, X1, SEED, X0, b, m, e, E_OFF, ok, stride_pb, stride_pm, stride_xb, stride_xm, HAS_NOISE, ACC)
    sq = tl.where(ok, d * d, 0.0)
    tl.store(PART + b * tl.num_programs(1) + pid1, tl.sum(sq, axis=0).to(tl.float32))


@triton.jit
def flow_loss_bwd_kernel(
    GRAD,  # grad of the loss: (1,) fp32
    PRED,  # pred: (B, M), strides (stride_pb, stride_pm)
    X1,  # x1: (B, M), strides (stride_xb, stride_xm)
    SEED,  # seed: (1,) int64 (read when not HAS_NOISE)
    X0,  # x0: (B, M) contiguous (read when HAS_NOISE)
    DPRED,  # out: (B, M) contiguous, dtype of pred
    DX1,  # out: (B, M) contiguous, dtype of x1
    M,
    E_OFF,  # int64 Philox counter offset: sample_offset·M
    numel,  # B·M
    stride_pb,
    stride_pm,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1).to(tl.int64)
    m, ok, e = _row(b, pid1, M, BLOCK)
    d = _residual(PRED, X1, SEED, X0, b, m, e, E_OFF, ok, stride_pb, stride_pm, stride_xb, stride_xm, HAS_NOISE, ACC)
    g = tl.load(GRAD).to(ACC)
    dp = (2.0 * g) * d / numel
    tl.store(DPRED + e, dp.to(DPRED.dtype.element_ty), mask=ok)
    tl.store(DX1 + e, (-dp).to(DX1.dtype.element_ty), mask=ok)
