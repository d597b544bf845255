"""Triton kernels for the DiT velocity flow-matching input ``x_t`` and loss (method §4) with in-kernel x0.

``x1`` of any shape (B, ...) is viewed as (B, M) (``M < 2**31``).  Noise: stream version 2 of
:mod:`rectok_fast.kernels.philox`: element ``m = q·4W + j·W + r`` of row ``b`` (``W = LANE``,
lane ``j`` in 0..3) draws normal ``j`` of the Philox call of (global sample ``b + sample_offset``,
group ``q·W + r``), so one Philox call serves four elements and a program handles ROWS chunks of
4W elements as four (ROWS, W) lane tiles (each contiguous along M: no shuffles).
``flow_matching_xt`` and ``flow_matching_loss`` called with the same seed see the same x0, and the
backwards regenerate it (never stored).  Per-sample reductions (dL/dt, the squared error) are one
fp32 partial per program in a (B, P) buffer summed by the launcher (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .philox import (
    bm_angle_cos,
    bm_angle_sin,
    bm_radius,
    flow_normals,
    philox4x32,
    philox_key,
    sample_words,
    to_store,
    zero_like_layout,
)

_DNS = ["seed_int", "s_off"]


@triton.jit
def _chunks(pid1, ROWS: tl.constexpr, LANE: tl.constexpr):
    """(ROWS, LANE) offsets of lane 0 of this program's chunks and their element groups (int32)."""
    q = pid1 * ROWS + tl.arange(0, ROWS)[:, None]
    r = tl.arange(0, LANE)[None, :]
    return q * (4 * LANE) + r, q * LANE + r


@triton.jit
def _ld(PTR, off, M, EVEN: tl.constexpr):
    """Load at in-row offsets ``off`` (masked past M unless EVEN: M is a multiple of 4·LANE)."""
    if EVEN:
        return tl.load(PTR + off)
    else:
        return tl.load(PTR + off, mask=off < M, other=0.0)


@triton.jit
def _st(PTR, off, v, M, EVEN: tl.constexpr):
    if EVEN:
        tl.store(PTR + off, to_store(v, PTR.dtype.element_ty))
    else:
        tl.store(PTR + off, to_store(v, PTR.dtype.element_ty), mask=off < M)


@triton.jit
def _x0(
    SEED,
    seed_int,
    s_off,
    X0,
    b,
    m0,
    g,
    M,
    like,
    HAS_NOISE: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    LANE: tl.constexpr,
    EVEN: tl.constexpr,
):
    """x0 of the four lane tiles (offsets m0 + j·LANE of row b), loaded (HAS_NOISE, X0 already
    offset to row b) or generated, in ACC; ``like``: a loaded lane tile whose register layout the
    generated noise takes."""
    if HAS_NOISE:
        a0 = _ld(X0, m0, M, EVEN).to(ACC)
        a1 = _ld(X0, m0 + LANE, M, EVEN).to(ACC)
        a2 = _ld(X0, m0 + 2 * LANE, M, EVEN).to(ACC)
        a3 = _ld(X0, m0 + 3 * LANE, M, EVEN).to(ACC)
    else:
        k0, k1 = philox_key(SEED, seed_int, SEED_IN_PTR)
        s_lo, s_hi = sample_words(b + s_off)
        a0, a1, a2, a3 = flow_normals(k0, k1, s_lo, s_hi, g, zero_like_layout(like), ROUNDS)
        a0, a1, a2, a3 = a0.to(ACC), a1.to(ACC), a2.to(ACC), a3.to(ACC)
    return a0, a1, a2, a3


@triton.jit
def _load4(PTR, m0, stride, M, LANE: tl.constexpr, EVEN: tl.constexpr):
    """The four lane tiles of a row (PTR already offset to the row), masked past M, as stored."""
    if EVEN:
        v0 = tl.load(PTR + m0 * stride)
        v1 = tl.load(PTR + (m0 + LANE) * stride)
        v2 = tl.load(PTR + (m0 + 2 * LANE) * stride)
        v3 = tl.load(PTR + (m0 + 3 * LANE) * stride)
    else:
        v0 = tl.load(PTR + m0 * stride, mask=m0 < M, other=0.0)
        v1 = tl.load(PTR + (m0 + LANE) * stride, mask=m0 + LANE < M, other=0.0)
        v2 = tl.load(PTR + (m0 + 2 * LANE) * stride, mask=m0 + 2 * LANE < M, other=0.0)
        v3 = tl.load(PTR + (m0 + 3 * LANE) * stride, mask=m0 + 3 * LANE < M, other=0.0)
    return v0, v1, v2, v3


@triton.jit
def _acc4(v, ACC: tl.constexpr):
    return v[0].to(ACC), v[1].to(ACC), v[2].to(ACC), v[3].to(ACC)


@triton.jit
def _store4(PTR, m0, M, v0, v1, v2, v3, LANE: tl.constexpr, EVEN: tl.constexpr):
    _st(PTR, m0, v0, M, EVEN)
    _st(PTR, m0 + LANE, v1, M, EVEN)
    _st(PTR, m0 + 2 * LANE, v2, M, EVEN)
    _st(PTR, m0 + 3 * LANE, v3, M, EVEN)


@triton.jit(do_not_specialize=_DNS)
def flow_xt_fwd_kernel(
    X1,  # x1: (B, M), strides (stride_xb, stride_xm)
    T,  # t: (B,) contiguous
    SEED,  # seed: (1,) int64 (read when SEED_IN_PTR and not HAS_NOISE)
    X0,  # x0: (B, M) contiguous (read when HAS_NOISE)
    XT,  # out: (B, M) contiguous, dtype of x1
    M,
    seed_int: tl.int64,
    s_off: tl.int64,  # sample_offset: global index of sample 0
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    LANE: tl.constexpr,
    EVEN: tl.constexpr,  # M is a multiple of 4·LANE·ROWS: no masks
):
    b = tl.program_id(0).to(tl.int64)
    m0, g = _chunks(tl.program_id(1), ROWS, LANE)
    x1r = _load4(X1 + b * stride_xb, m0, stride_xm, M, LANE, EVEN)
    x0 = _x0(SEED, seed_int, s_off, X0 + b * M, b, m0, g, M, x1r[0], HAS_NOISE, SEED_IN_PTR, ROUNDS, ACC, LANE, EVEN)
    x1 = _acc4(x1r, ACC)
    tt = tl.load(T + b).to(ACC)
    omt = 1.0 - tt
    _store4(
        XT + b * M,
        m0,
        M,
        tt * x1[0] + omt * x0[0],
        tt * x1[1] + omt * x0[1],
        tt * x1[2] + omt * x0[2],
        tt * x1[3] + omt * x0[3],
        LANE,
        EVEN,
    )


@triton.jit(do_not_specialize=_DNS)
def flow_xt_bwd_kernel(
    GRAD,  # grad of x_t: (B, M) contiguous
    X1,  # x1: (B, M), strides (stride_xb, stride_xm) (read when NEED_DT)
    T,  # t: (B,) contiguous
    SEED,  # seed: (1,) int64 (read when SEED_IN_PTR, NEED_DT and not HAS_NOISE)
    X0,  # x0: (B, M) contiguous (read when HAS_NOISE and NEED_DT)
    DX1,  # out: (B, M) contiguous, dtype of x1 (written when NEED_DX1)
    DT_PART,  # out: (B, P) fp32 contiguous, P = num_programs(1) (written when NEED_DT)
    M,
    seed_int: tl.int64,
    s_off: tl.int64,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    NEED_DX1: tl.constexpr,
    NEED_DT: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    LANE: tl.constexpr,
    EVEN: tl.constexpr,  # M is a multiple of 4·LANE·ROWS: no masks
):
    b = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1)
    m0, g = _chunks(pid1, ROWS, LANE)
    grr = _load4(GRAD + b * M, m0, 1, M, LANE, EVEN)
    gr = _acc4(grr, ACC)
    if NEED_DX1:
        tt = tl.load(T + b).to(ACC)
        _store4(DX1 + b * M, m0, M, tt * gr[0], tt * gr[1], tt * gr[2], tt * gr[3], LANE, EVEN)
    if NEED_DT:  # dx_t/dt = x1 − x0
        x0 = _x0(
            SEED, seed_int, s_off, X0 + b * M, b, m0, g, M, grr[0], HAS_NOISE, SEED_IN_PTR, ROUNDS, ACC, LANE, EVEN
        )
        x1 = _acc4(_load4(X1 + b * stride_xb, m0, stride_xm, M, LANE, EVEN), ACC)
        dt = gr[0] * (x1[0] - x0[0]) + gr[1] * (x1[1] - x0[1]) + gr[2] * (x1[2] - x0[2]) + gr[3] * (x1[3] - x0[3])
        tl.store(DT_PART + b * tl.num_programs(1) + pid1, tl.sum(tl.sum(dt.to(tl.float32), axis=1), axis=0))


@triton.jit
def _residual4(
    PRED,
    X1,
    SEED,
    seed_int,
    s_off,
    X0,
    b,
    m0,
    g,
    M,
    stride_pb,
    stride_pm,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    LANE: tl.constexpr,
    EVEN: tl.constexpr,
):
    """``pred − (x1 − x0)`` of the four lane tiles, in ACC (0 past M)."""
    x1r = _load4(X1 + b * stride_xb, m0, stride_xm, M, LANE, EVEN)
    p = _acc4(_load4(PRED + b * stride_pb, m0, stride_pm, M, LANE, EVEN), ACC)
    x0 = _x0(SEED, seed_int, s_off, X0 + b * M, b, m0, g, M, x1r[0], HAS_NOISE, SEED_IN_PTR, ROUNDS, ACC, LANE, EVEN)
    x1 = _acc4(x1r, ACC)
    # masked elements: p = x1 = 0 but x0 != 0 when generated
    d0 = p[0] - (x1[0] - x0[0])
    d1 = p[1] - (x1[1] - x0[1])
    d2 = p[2] - (x1[2] - x0[2])
    d3 = p[3] - (x1[3] - x0[3])
    if not EVEN:
        d0 = tl.where(m0 < M, d0, 0.0)
        d1 = tl.where(m0 + LANE < M, d1, 0.0)
        d2 = tl.where(m0 + 2 * LANE < M, d2, 0.0)
        d3 = tl.where(m0 + 3 * LANE < M, d3, 0.0)
    return d0, d1, d2, d3


@triton.jit(do_not_specialize=_DNS)
def flow_loss_fwd_kernel(
    PRED,  # pred: (B, M), strides (stride_pb, stride_pm)
    X1,  # x1: (B, M), strides (stride_xb, stride_xm)
    SEED,  # seed: (1,) int64 (read when SEED_IN_PTR and not HAS_NOISE)
    X0,  # x0: (B, M) contiguous (read when HAS_NOISE)
    PART,  # out: (B, P) fp32 contiguous, partial sums of (pred − (x1 − x0))² / (B·M)
    M,
    inv_numel: tl.float64,  # 1 / (B·M): the partials are pre-scaled, the loss is their sum
    seed_int: tl.int64,
    s_off: tl.int64,
    stride_pb,
    stride_pm,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    LANE: tl.constexpr,
    EVEN: tl.constexpr,  # M is a multiple of 4·LANE·ROWS: no masks
):
    b = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1)
    m0, g = _chunks(pid1, ROWS, LANE)
    d0, d1, d2, d3 = _residual4(
        PRED,
        X1,
        SEED,
        seed_int,
        s_off,
        X0,
        b,
        m0,
        g,
        M,
        stride_pb,
        stride_pm,
        stride_xb,
        stride_xm,
        HAS_NOISE,
        SEED_IN_PTR,
        ROUNDS,
        ACC,
        LANE,
        EVEN,
    )
    sq = d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3
    tl.store(PART + b * tl.num_programs(1) + pid1, (tl.sum(tl.sum(sq, axis=1), axis=0) * inv_numel).to(tl.float32))


@triton.jit(do_not_specialize=_DNS)
def flow_loss_bwd_kernel(
    GRAD,  # grad of the loss: (1,) fp32
    PRED,  # pred: (B, M), strides (stride_pb, stride_pm)
    X1,  # x1: (B, M), strides (stride_xb, stride_xm)
    SEED,  # seed: (1,) int64 (read when SEED_IN_PTR and not HAS_NOISE)
    X0,  # x0: (B, M) contiguous (read when HAS_NOISE)
    DPRED,  # out: (B, M) contiguous, dtype of pred (written when NEED_DPRED)
    DX1,  # out: (B, M) contiguous, dtype of x1 (written when NEED_DX1)
    M,
    inv_numel: tl.float64,  # 2 / (B·M): d loss / d pred = grad · inv_numel · (pred − (x1 − x0))
    seed_int: tl.int64,
    s_off: tl.int64,
    stride_pb,
    stride_pm,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    NEED_DPRED: tl.constexpr,
    NEED_DX1: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    LANE: tl.constexpr,
    EVEN: tl.constexpr,  # M is a multiple of 4·LANE·ROWS: no masks
):
    b = tl.program_id(0).to(tl.int64)
    m0, g = _chunks(tl.program_id(1), ROWS, LANE)
    d0, d1, d2, d3 = _residual4(
        PRED,
        X1,
        SEED,
        seed_int,
        s_off,
        X0,
        b,
        m0,
        g,
        M,
        stride_pb,
        stride_pm,
        stride_xb,
        stride_xm,
        HAS_NOISE,
        SEED_IN_PTR,
        ROUNDS,
        ACC,
        LANE,
        EVEN,
    )
    scale = (tl.load(GRAD).to(tl.float64) * inv_numel).to(ACC)  # one scalar: no per-element division
    if NEED_DPRED:
        _store4(DPRED + b * M, m0, M, scale * d0, scale * d1, scale * d2, scale * d3, LANE, EVEN)
    if NEED_DX1:
        _store4(DX1 + b * M, m0, M, -scale * d0, -scale * d1, -scale * d2, -scale * d3, LANE, EVEN)


@triton.jit(do_not_specialize=_DNS)
def flow_noise_kernel(
    SEED,  # seed: (1,) int64 (read when SEED_IN_PTR)
    X0,  # out: (B, M) contiguous
    M,
    seed_int: tl.int64,
    s_off: tl.int64,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ROWS: tl.constexpr,
    LANE: tl.constexpr,
    EVEN: tl.constexpr,  # M is a multiple of 4·LANE·ROWS: no masks
):
    """Materialise the x0 that the fused kernels generate (``flow_matching_noise``, tests)."""
    b = tl.program_id(0).to(tl.int64)
    m0, g = _chunks(tl.program_id(1), ROWS, LANE)
    k0, k1 = philox_key(SEED, seed_int, SEED_IN_PTR)
    s_lo, s_hi = sample_words(b + s_off)
    a0, a1, a2, a3 = flow_normals(k0, k1, s_lo, s_hi, g, g.to(tl.uint32) * 0, ROUNDS)
    _store4(X0 + b * M, m0, M, a0, a1, a2, a3, LANE, EVEN)


# ----------------------------------------------------------------------------- cosine term (LightningDiT)
# ``x1`` viewed as (B, C, S) (S = prod of the dims after the channel dim, element m = c·S + s of the
# row): a program owns BLOCK_S spatial positions of one sample and loops over C, accumulating the
# per-position channel reductions (pred·v, |pred|², |v|², v = x1 − x0) and the squared error in ACC
# (fp32; fp64 for fp64 inputs), then writes one partial (deterministic, no atomics).  x0 is the
# lane-tile kernels' stream, bit for bit: when S divides LANE (PAIRED, K = LANE // S) the four lanes
# of one Philox call are the channels c, c + K, c + 2K, c + 3K of a position and one call serves
# all four; otherwise each element computes only its own lane (j = (m // LANE) % 4) of the call of
# group (m // 4·LANE)·LANE + m % LANE.


@triton.jit
def _x0_at(
    SEED,
    seed_int,
    s_off,
    X0,
    b,
    m,
    mask,
    HAS_NOISE: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    LANE: tl.constexpr,
):
    """x0 of in-row elements ``m`` (any int32 tile) of row b, 0 where not ``mask``, in ACC."""
    if HAS_NOISE:
        a = tl.load(X0 + m, mask=mask, other=0.0).to(ACC)
    else:
        k0, k1 = philox_key(SEED, seed_int, SEED_IN_PTR)
        s_lo, s_hi = sample_words(b + s_off)
        g = (m // (4 * LANE)) * LANE + m % LANE
        j = (m // LANE) % 4
        # flow_normals' lane j of its Philox call, computing only that lane's Box–Muller half:
        # j = 0, 1: r(w0)·(cos, sin)(w1); j = 2, 3: r(w2)·(cos, sin)(w3) (the same arithmetic, bit for bit)
        w0, w1, w2, w3 = philox4x32(g.to(tl.uint32), s_lo * 0, s_lo, s_hi, k0, k1, ROUNDS)
        lo = j < 2
        wa = tl.where(lo, w1, w3)
        ang = tl.where((j & 1) == 0, bm_angle_cos(wa), bm_angle_sin(wa))
        a = (bm_radius(tl.where(lo, w0, w2)) * ang).to(ACC)
        a = tl.where(mask, a, 0.0)
    return a


@triton.jit
def _pv_tile(
    PRED,
    X1,
    SEED,
    seed_int,
    s_off,
    X0,
    b,
    m,
    mask,
    M,
    stride_pb,
    stride_pm,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    LANE: tl.constexpr,
):
    """(pred, v = x1 − x0) of a (BLOCK_C, BLOCK_S) tile of row b in ACC, 0 where not ``mask``."""
    p = tl.load(PRED + b * stride_pb + m * stride_pm, mask=mask, other=0.0).to(ACC)
    x1 = tl.load(X1 + b * stride_xb + m * stride_xm, mask=mask, other=0.0).to(ACC)
    x0 = _x0_at(SEED, seed_int, s_off, X0 + b * M, b, m, mask, HAS_NOISE, SEED_IN_PTR, ROUNDS, ACC, LANE)
    return p, x1 - x0


@triton.jit
def _lane_pv(
    PRED,
    X1,
    X0,
    b,
    m,
    mask,
    x0,
    M,
    stride_pb,
    stride_pm,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
):
    """(pred, v = x1 − x0) of one lane tile of the paired layout (``x0``: its generated lane)."""
    p = tl.load(PRED + b * stride_pb + m * stride_pm, mask=mask, other=0.0).to(ACC)
    x1 = tl.load(X1 + b * stride_xb + m * stride_xm, mask=mask, other=0.0).to(ACC)
    if HAS_NOISE:
        n = tl.load(X0 + b * M + m, mask=mask, other=0.0).to(ACC)
    else:
        n = tl.where(mask, x0.to(ACC), 0.0)
    return p, x1 - n


@triton.jit
def _paired(
    SEED,
    seed_int,
    s_off,
    b,
    u,
    s,
    S,
    K,
    HAS_NOISE: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    LANE: tl.constexpr,
):
    """Paired layout (S divides LANE, K = LANE // S): lane-0 channel index ``u = q·K + r`` (r < K)
    stands for channels ``q·4K + j·K + r`` (j = 0..3) at position s, elements ``m0 + j·LANE`` with
    ``m0 = (q·4K + r)·S + s``: the four lanes of the Philox call of group ``q·LANE + r·S + s``.
    Returns (channel of lane 0, m0, x0 of lanes 0..3 (zeros with HAS_NOISE))."""
    q = u // K
    r = u - q * K
    cb = q * (4 * K) + r
    m0 = cb * S + s
    if HAS_NOISE:
        z = (m0 * 0).to(tl.float32)
        a0, a1, a2, a3 = z, z, z, z
    else:
        k0, k1 = philox_key(SEED, seed_int, SEED_IN_PTR)
        s_lo, s_hi = sample_words(b + s_off)
        g = q * LANE + r * S + s
        a0, a1, a2, a3 = flow_normals(k0, k1, s_lo, s_hi, g, g.to(tl.uint32) * 0, ROUNDS)
    return cb, m0, a0, a1, a2, a3


@triton.jit
def _acc_lane(dot, pp, vv, sq, p, v):
    d = p - v
    return dot + tl.sum(p * v, axis=0), pp + tl.sum(p * p, axis=0), vv + tl.sum(v * v, axis=0), sq + d * d


@triton.jit
def _cos_sums(
    PRED,
    X1,
    SEED,
    seed_int,
    s_off,
    X0,
    b,
    s,
    smask,
    C,
    S,
    M,
    K,
    stride_pb,
    stride_pm,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    LANE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PAIRED: tl.constexpr,
):
    """Per spatial position (BLOCK_S,): pred·v, |pred|², |v|²; and the tile's sum of (pred − v)².
    PAIRED: one Philox call serves four channels (see :func:`_paired`); else each element draws its lane."""
    dot = tl.zeros((BLOCK_S,), dtype=ACC)
    pp = tl.zeros((BLOCK_S,), dtype=ACC)
    vv = tl.zeros((BLOCK_S,), dtype=ACC)
    sq = tl.zeros((BLOCK_C, BLOCK_S), dtype=ACC)
    if PAIRED:
        for u0 in range(0, tl.cdiv(C, 4 * K) * K, BLOCK_C):
            u = u0 + tl.arange(0, BLOCK_C)[:, None]
            cb, m0, a0, a1, a2, a3 = _paired(SEED, seed_int, s_off, b, u, s, S, K, HAS_NOISE, SEED_IN_PTR, ROUNDS, LANE)
            p, v = _lane_pv(
                PRED, X1, X0, b, m0, (cb < C) & smask, a0, M, stride_pb, stride_pm, stride_xb, stride_xm, HAS_NOISE, ACC
            )
            dot, pp, vv, sq = _acc_lane(dot, pp, vv, sq, p, v)
            p, v = _lane_pv(
                PRED,
                X1,
                X0,
                b,
                m0 + LANE,
                (cb + K < C) & smask,
                a1,
                M,
                stride_pb,
                stride_pm,
                stride_xb,
                stride_xm,
                HAS_NOISE,
                ACC,
            )
            dot, pp, vv, sq = _acc_lane(dot, pp, vv, sq, p, v)
            p, v = _lane_pv(
                PRED,
                X1,
                X0,
                b,
                m0 + 2 * LANE,
                (cb + 2 * K < C) & smask,
                a2,
                M,
                stride_pb,
                stride_pm,
                stride_xb,
                stride_xm,
                HAS_NOISE,
                ACC,
            )
            dot, pp, vv, sq = _acc_lane(dot, pp, vv, sq, p, v)
            p, v = _lane_pv(
                PRED,
                X1,
                X0,
                b,
                m0 + 3 * LANE,
                (cb + 3 * K < C) & smask,
                a3,
                M,
                stride_pb,
                stride_pm,
                stride_xb,
                stride_xm,
                HAS_NOISE,
                ACC,
            )
            dot, pp, vv, sq = _acc_lane(dot, pp, vv, sq, p, v)
    else:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)[:, None]
            mask = (c < C) & smask
            p, v = _pv_tile(
                PRED,
                X1,
                SEED,
                seed_int,
                s_off,
                X0,
                b,
                c * S + s,
                mask,
                M,
                stride_pb,
                stride_pm,
                stride_xb,
                stride_xm,
                HAS_NOISE,
                SEED_IN_PTR,
                ROUNDS,
                ACC,
                LANE,
            )
            dot, pp, vv, sq = _acc_lane(dot, pp, vv, sq, p, v)
    return dot, pp, vv, tl.sum(tl.sum(sq, axis=1), axis=0)


@triton.jit
def _grad_lane(DPRED, DX1, b, M, m, mask, p, v, gm, a, kp, kv, NEED_DPRED: tl.constexpr, NEED_DX1: tl.constexpr):
    dm = gm * (p - v)
    if NEED_DPRED:
        tl.store(DPRED + b * M + m, to_store(dm - a * v + kp * p, DPRED.dtype.element_ty), mask=mask)
    if NEED_DX1:
        tl.store(DX1 + b * M + m, to_store(-dm - a * p + kv * v, DX1.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_DNS)
def flow_cos_loss_fwd_kernel(
    PRED,  # pred: (B, C·S), strides (stride_pb, stride_pm)
    X1,  # x1: (B, C·S), strides (stride_xb, stride_xm)
    SEED,  # seed: (1,) int64 (read when SEED_IN_PTR and not HAS_NOISE)
    X0,  # x0: (B, C·S) contiguous (read when HAS_NOISE)
    PART,  # out: (B, P) fp32, Σ(pred − v)²/(B·C·S) + w·Σ_s(1 − cos)/(B·S) of the program's positions
    C,
    S,
    K: tl.constexpr,  # LANE // S when PAIRED (a power of two: shifts), else 1
    inv_numel: tl.float64,  # 1 / (B·C·S)
    cos_scale: tl.float64,  # cosine_weight / (B·S)
    seed_int: tl.int64,
    s_off: tl.int64,
    stride_pb,
    stride_pm,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    LANE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PAIRED: tl.constexpr,  # S divides LANE: one Philox call per four channels
    EPS: tl.constexpr,  # each norm is clamped to EPS on its own (F.cosine_similarity)
):
    b = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1)
    s1 = pid1 * BLOCK_S + tl.arange(0, BLOCK_S)
    s = s1[None, :]
    smask = s < S
    dot, pp, vv, sq = _cos_sums(
        PRED,
        X1,
        SEED,
        seed_int,
        s_off,
        X0,
        b,
        s,
        smask,
        C,
        S,
        C * S,
        K,
        stride_pb,
        stride_pm,
        stride_xb,
        stride_xm,
        HAS_NOISE,
        SEED_IN_PTR,
        ROUNDS,
        ACC,
        LANE,
        BLOCK_C,
        BLOCK_S,
        PAIRED,
    )
    cos = dot / (tl.maximum(tl.sqrt(pp), EPS) * tl.maximum(tl.sqrt(vv), EPS))
    one_minus = tl.where(s1 < S, 1.0 - cos, 0.0)
    tot = sq * inv_numel + tl.sum(one_minus, axis=0) * cos_scale
    tl.store(PART + b * tl.num_programs(1) + pid1, tot.to(tl.float32))


@triton.jit(do_not_specialize=_DNS)
def flow_cos_loss_bwd_kernel(
    GRAD,  # grad of the loss: (1,) fp32
    PRED,  # pred: (B, C·S), strides (stride_pb, stride_pm)
    X1,  # x1: (B, C·S), strides (stride_xb, stride_xm)
    SEED,  # seed: (1,) int64 (read when SEED_IN_PTR and not HAS_NOISE)
    X0,  # x0: (B, C·S) contiguous (read when HAS_NOISE)
    DPRED,  # out: (B, C·S) contiguous, dtype of pred (written when NEED_DPRED)
    DX1,  # out: (B, C·S) contiguous, dtype of x1 (written when NEED_DX1)
    C,
    S,
    K: tl.constexpr,  # LANE // S when PAIRED (a power of two: shifts), else 1
    inv_numel: tl.float64,  # 2 / (B·C·S)
    cos_scale: tl.float64,  # cosine_weight / (B·S)
    seed_int: tl.int64,
    s_off: tl.int64,
    stride_pb,
    stride_pm,
    stride_xb,
    stride_xm,
    HAS_NOISE: tl.constexpr,
    NEED_DPRED: tl.constexpr,
    NEED_DX1: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    LANE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PAIRED: tl.constexpr,
    EPS: tl.constexpr,
):
    """Two passes over C: the reductions, then the gradients (x0 regenerated in both).
    d cos/d pred = v/(n̂p·n̂v) − cos·pred/(n̂p·|pred|) with n̂ = max(|·|, eps) (torch's gradient of
    F.cosine_similarity; the second term is 0 where |pred| = 0), symmetrically for v = x1 − x0."""
    b = tl.program_id(0).to(tl.int64)
    s = (tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S))[None, :]
    smask = s < S
    M = C * S
    dot, pp, vv, sq = _cos_sums(
        PRED,
        X1,
        SEED,
        seed_int,
        s_off,
        X0,
        b,
        s,
        smask,
        C,
        S,
        M,
        K,
        stride_pb,
        stride_pm,
        stride_xb,
        stride_xm,
        HAS_NOISE,
        SEED_IN_PTR,
        ROUNDS,
        ACC,
        LANE,
        BLOCK_C,
        BLOCK_S,
        PAIRED,
    )
    pn = tl.sqrt(pp)
    vn = tl.sqrt(vv)
    pc = tl.maximum(pn, EPS)
    vc = tl.maximum(vn, EPS)
    cos = dot / (pc * vc)
    g = tl.load(GRAD).to(tl.float64)
    gm = (g * inv_numel).to(ACC)
    gc = (g * cos_scale).to(ACC)
    a = (gc / (pc * vc))[None, :]  # d(−gc·cos) = −gc·(a·v − …)
    kp = (gc * cos * tl.where(pn > 0, 1.0 / (pc * tl.where(pn > 0, pn, 1.0)), 0.0))[None, :]
    kv = (gc * cos * tl.where(vn > 0, 1.0 / (vc * tl.where(vn > 0, vn, 1.0)), 0.0))[None, :]
    if PAIRED:
        for u0 in range(0, tl.cdiv(C, 4 * K) * K, BLOCK_C):
            u = u0 + tl.arange(0, BLOCK_C)[:, None]
            cb, m0, a0, a1, a2, a3 = _paired(SEED, seed_int, s_off, b, u, s, S, K, HAS_NOISE, SEED_IN_PTR, ROUNDS, LANE)
            mk = (cb < C) & smask
            p, v = _lane_pv(PRED, X1, X0, b, m0, mk, a0, M, stride_pb, stride_pm, stride_xb, stride_xm, HAS_NOISE, ACC)
            _grad_lane(DPRED, DX1, b, M, m0, mk, p, v, gm, a, kp, kv, NEED_DPRED, NEED_DX1)
            m1, mk = m0 + LANE, (cb + K < C) & smask
            p, v = _lane_pv(PRED, X1, X0, b, m1, mk, a1, M, stride_pb, stride_pm, stride_xb, stride_xm, HAS_NOISE, ACC)
            _grad_lane(DPRED, DX1, b, M, m1, mk, p, v, gm, a, kp, kv, NEED_DPRED, NEED_DX1)
            m2, mk = m0 + 2 * LANE, (cb + 2 * K < C) & smask
            p, v = _lane_pv(PRED, X1, X0, b, m2, mk, a2, M, stride_pb, stride_pm, stride_xb, stride_xm, HAS_NOISE, ACC)
            _grad_lane(DPRED, DX1, b, M, m2, mk, p, v, gm, a, kp, kv, NEED_DPRED, NEED_DX1)
            m3, mk = m0 + 3 * LANE, (cb + 3 * K < C) & smask
            p, v = _lane_pv(PRED, X1, X0, b, m3, mk, a3, M, stride_pb, stride_pm, stride_xb, stride_xm, HAS_NOISE, ACC)
            _grad_lane(DPRED, DX1, b, M, m3, mk, p, v, gm, a, kp, kv, NEED_DPRED, NEED_DX1)
    else:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)[:, None]
            mask = (c < C) & smask
            m = c * S + s
            p, v = _pv_tile(
                PRED,
                X1,
                SEED,
                seed_int,
                s_off,
                X0,
                b,
                m,
                mask,
                M,
                stride_pb,
                stride_pm,
                stride_xb,
                stride_xm,
                HAS_NOISE,
                SEED_IN_PTR,
                ROUNDS,
                ACC,
                LANE,
            )
            _grad_lane(DPRED, DX1, b, M, m, mask, p, v, gm, a, kp, kv, NEED_DPRED, NEED_DX1)
