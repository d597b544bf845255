"""Triton kernels for the posterior sample + forward-flow interpolation + KL (method §2).

Noise: stream version 2 of :mod:`rectok_fast.kernels.philox`.  Element (b, n, c) of a (B, N, C)
latent draws ``eps_post`` and ``eps_flow`` from the Philox call of (global sample
``b + sample_offset``, token pair ``n // 2``, channel ``c``): one call gives both noises of tokens
``2p`` and ``2p + 1``.  So a program handles a tile of BLOCK_P token *pairs* × BLOCK_C channels
of one sample, loading the even and the odd tokens of the tile as two (BLOCK_P, BLOCK_C) tiles
(rows stay contiguous along C; no shuffles).  The stream does not depend on N, C, the tile sizes
or the backend's grid.  Per-sample reductions (KL in the forward, dL/dt in the backward) are one
fp32 partial per program in a (B, P) buffer summed by the launcher (deterministic, no atomics).

Index math: the per-program base offsets are int64 scalars; per-element offsets inside a tile are
int32 (the launcher guarantees a tile spans < 2**31 elements of every tensor).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .philox import philox_key, posterior_normals, sample_words, to_store, zero_like_layout

LOGVAR_MIN: tl.constexpr = tl.constexpr(-30.0)
LOGVAR_MAX: tl.constexpr = tl.constexpr(20.0)
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_HALF_LOG2E: tl.constexpr = tl.constexpr(0.7213475204444817)

# integer arguments that change from step to step (token count K = N after masking and the partial
# count that follows it, the seed, the sample offset): never specialised, so a new mask ratio or seed
# never recompiles.  The batch stride N·2C stays specialised (divisible by 16 whenever C is a
# multiple of 8, whatever N): it keeps the loads vectorised.
_DNS = ["N", "P", "seed_int", "s_off", "b_base"]


@triton.jit
def _pair_tile(b_base, N, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (pair blocks, channel blocks, samples from ``b_base``): sample ``b`` (int64), first
    token ``n0`` (int32), pair indices ``p`` (BLOCK_P,), channels ``c`` (BLOCK_C,), in-tile row
    offsets of the even tokens ``row`` (BLOCK_P,) and the masks of the even / odd tokens
    (BLOCK_P, BLOCK_C); ``part`` is this program's partial-sum slot (no integer division)."""
    pb = tl.program_id(0)
    pid1 = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64) + b_base
    i = tl.arange(0, BLOCK_P)
    p = pb * BLOCK_P + i
    c = pid1 * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_c = (c < C)[None, :]
    ok_e = ((2 * p) < N)[:, None] & ok_c
    ok_o = ((2 * p + 1) < N)[:, None] & ok_c
    part = pb * tl.num_programs(1) + pid1
    return b, pb * (2 * BLOCK_P), p, c, 2 * i, ok_e, ok_o, part


@triton.jit
def _clamp_logvar(lv):
    # NaN propagates (as torch.clamp)
    return tl.clamp(lv, LOGVAR_MIN, LOGVAR_MAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _noise4(
    SEED,
    seed_int,
    s_off,
    EPS1,
    EPS2,
    b,
    p,
    c,
    off_e,
    off_o,
    ok_e,
    ok_o,
    like,
    HAS_NOISE: tl.constexpr,
    NEED_POST: tl.constexpr,
    NEED_FLOW: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
):
    """(eps_post even, eps_post odd, eps_flow even, eps_flow odd) of the tile in ACC: loaded from
    EPS1/EPS2 at the (B, N, C) offsets (HAS_NOISE) or generated.  A noise that is not NEED_* is
    neither loaded nor generated (zeros stand in for it, never read).  ``like``: a loaded
    (BLOCK_P, BLOCK_C) tile whose register layout the generated noise takes."""
    if HAS_NOISE:
        pe = tl.zeros_like(ok_e).to(ACC)
        po = pe
        fe = pe
        fo = pe
        if NEED_FLOW:
            fe = tl.load(EPS2 + off_e, mask=ok_e, other=0.0).to(ACC)
            fo = tl.load(EPS2 + off_o, mask=ok_o, other=0.0).to(ACC)
        if NEED_POST:
            pe = tl.load(EPS1 + off_e, mask=ok_e, other=0.0).to(ACC)
            po = tl.load(EPS1 + off_o, mask=ok_o, other=0.0).to(ACC)
    else:
        k0, k1 = philox_key(SEED, seed_int, SEED_IN_PTR)
        s_lo, s_hi = sample_words(b + s_off)
        zero = zero_like_layout(like)
        pe, po, fe, fo = posterior_normals(
            k0, k1, s_lo, s_hi, p[:, None], c[None, :], zero, ROUNDS, NEED_POST, NEED_FLOW
        )
        pe, po, fe, fo = pe.to(ACC), po.to(ACC), fe.to(ACC), fo.to(ACC)
    return pe, po, fe, fo


@triton.jit
def _fwd_half(
    mean,
    lv_raw,
    Z,
    ZT,
    z_off,
    ok,
    one_minus_t,
    t_gamma,
    eps_post,
    eps_flow,
    SAMPLE: tl.constexpr,
    WRITE_Z: tl.constexpr,
    ACC: tl.constexpr,
):
    """z, z_t of the even or the odd tokens of the tile (moments loaded); returns their KL terms
    (fp32, 0 where masked)."""
    mean = mean.to(ACC)
    lv = _clamp_logvar(lv_raw.to(ACC))
    if SAMPLE:
        std = tl.exp2(lv * _HALF_LOG2E)  # exp(lv / 2)
        var = std * std
        z = mean + std * eps_post
    else:
        var = tl.exp2(lv * _LOG2E)
        z = mean
    # same operation order as the reference: (1 - t)·z + (t·γ)·ε₂
    zt = one_minus_t * z + t_gamma * eps_flow
    if WRITE_Z:
        tl.store(Z + z_off, to_store(z, Z.dtype.element_ty), mask=ok)
    tl.store(ZT + z_off, to_store(zt, ZT.dtype.element_ty), mask=ok)
    return (mean * mean + var - 1.0 - lv).to(tl.float32)  # 0 where masked (mean = lv = 0)


@triton.jit(do_not_specialize=_DNS)
def posterior_flow_fwd_kernel(
    MOMENTS,  # moments: (B, N, 2C), strides (stride_mb, stride_mn, stride_mc)
    T,  # t: (B,) any float dtype, contiguous
    SEED,  # seed: (1,) int64 (read when SEED_IN_PTR and not HAS_NOISE)
    EPS1,  # eps_post: (B, N, C) contiguous (read when HAS_NOISE and SAMPLE)
    EPS2,  # eps_flow: (B, N, C) contiguous (read when HAS_NOISE)
    Z,  # out z: (B, N, C) contiguous, dtype of moments (written when WRITE_Z)
    ZT,  # out z_t: (B, N, C) contiguous, dtype of moments
    KL_PART,  # out: (B, P) fp32 contiguous, P = n_blocks · num_programs(1)
    N,
    C,
    P,
    seed_int: tl.int64,  # the seed when not SEED_IN_PTR
    s_off: tl.int64,  # sample_offset: global index of sample 0
    b_base: tl.int64,  # first sample of this launch (grid dim 2 holds at most 65535 samples)
    gamma,
    stride_mb,
    stride_mn,
    stride_mc,
    HAS_NOISE: tl.constexpr,
    SAMPLE: tl.constexpr,
    FLOW: tl.constexpr,  # eps_flow enters z_t: explicit noise or gamma != 0 (generated noise is finite, so with
    # gamma = 0 it is not drawn: t·0·eps = 0 exactly)
    WRITE_Z: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,  # compute dtype: tl.float32 (tl.float64 for fp64 inputs)
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b, n0, p, c, row, ok_e, ok_o, part = _pair_tile(b_base, N, C, BLOCK_P, BLOCK_C)
    # int64 scalar bases, int32 in-tile offsets
    m_base = b * stride_mb + n0.to(tl.int64) * stride_mn
    z_base = (b * N + n0) * C
    m_e = row[:, None] * stride_mn + c[None, :] * stride_mc
    z_e = row[:, None] * C + c[None, :]
    M = MOMENTS + m_base
    mean_e = tl.load(M + m_e, mask=ok_e, other=0.0)
    lv_e = tl.load(M + m_e + C * stride_mc, mask=ok_e, other=0.0)
    mean_o = tl.load(M + m_e + stride_mn, mask=ok_o, other=0.0)
    lv_o = tl.load(M + m_e + stride_mn + C * stride_mc, mask=ok_o, other=0.0)
    pe, po, fe, fo = _noise4(
        SEED,
        seed_int,
        s_off,
        EPS1 + z_base,
        EPS2 + z_base,
        b,
        p,
        c,
        z_e,
        z_e + C,
        ok_e,
        ok_o,
        mean_e,
        HAS_NOISE,
        SAMPLE,
        FLOW,
        SEED_IN_PTR,
        ROUNDS,
        ACC,
    )
    tt = tl.load(T + b).to(ACC)
    one_minus_t = 1.0 - tt
    t_gamma = tt * gamma
    kl = _fwd_half(mean_e, lv_e, Z + z_base, ZT + z_base, z_e, ok_e, one_minus_t, t_gamma, pe, fe, SAMPLE, WRITE_Z, ACC)
    kl += _fwd_half(
        mean_o, lv_o, Z + z_base, ZT + z_base, z_e + C, ok_o, one_minus_t, t_gamma, po, fo, SAMPLE, WRITE_Z, ACC
    )
    tl.store(KL_PART + b * P + part, 0.5 * tl.sum(tl.sum(kl, axis=1), axis=0))


@triton.jit
def _bwd_half(
    mean,
    lv_raw,
    GZ,
    GZT,
    DMOMENTS,
    z_off,
    d_off,
    ok,
    C,
    one_minus_t,
    gamma,
    gkl,
    eps_post,
    eps_flow,
    HAS_GZ: tl.constexpr,
    HAS_GZT: tl.constexpr,
    HAS_GKL: tl.constexpr,
    SAMPLE: tl.constexpr,
    NEED_DT: tl.constexpr,
    ACC: tl.constexpr,
):
    """dmoments of the even or the odd tokens of the tile (moments loaded); returns their dL/dt
    terms (fp32)."""
    mean = mean.to(ACC)
    lv_raw = lv_raw.to(ACC)
    # the clamp's gradient passes where LOGVAR_MIN <= logvar <= LOGVAR_MAX (inclusive, the
    # project's convention, stated in the reference with the same mask)
    keep = (lv_raw >= LOGVAR_MIN) & (lv_raw <= LOGVAR_MAX)
    lv = _clamp_logvar(lv_raw)
    if HAS_GZT:
        gzt = tl.load(GZT + z_off, mask=ok, other=0.0).to(ACC)
        if HAS_GZ:
            dz = tl.load(GZ + z_off, mask=ok, other=0.0).to(ACC) + one_minus_t * gzt  # total gradient reaching z
        else:
            dz = one_minus_t * gzt
    else:
        gzt = mean * 0.0
        if HAS_GZ:
            dz = tl.load(GZ + z_off, mask=ok, other=0.0).to(ACC)
        else:
            dz = mean * 0.0
    if SAMPLE:
        std = tl.exp2(lv * _HALF_LOG2E)
        dlv = dz * (0.5 * std * eps_post)
        if HAS_GKL:
            dlv += 0.5 * gkl * (std * std - 1.0)
        z = mean + std * eps_post
    else:
        dlv = 0.5 * gkl * (tl.exp2(lv * _LOG2E) - 1.0)
        z = mean
    dmean = dz
    if HAS_GKL:
        dmean += gkl * mean
    dlv = tl.where(keep, dlv, 0.0)
    tl.store(DMOMENTS + d_off, to_store(dmean, DMOMENTS.dtype.element_ty), mask=ok)
    tl.store(DMOMENTS + d_off + C, to_store(dlv, DMOMENTS.dtype.element_ty), mask=ok)
    if NEED_DT:
        return (gzt * (gamma * eps_flow - z)).to(tl.float32)  # dz_t/dt = γ·ε₂ − z; 0 where masked (gzt = 0)
    else:
        return mean.to(tl.float32) * 0.0


@triton.jit(do_not_specialize=_DNS)
def posterior_flow_bwd_kernel(
    MOMENTS,  # moments: (B, N, 2C), strides (stride_mb, stride_mn, stride_mc)
    T,  # t: (B,) contiguous
    SEED,  # seed: (1,) int64 (read when SEED_IN_PTR and not HAS_NOISE)
    EPS1,  # eps_post: (B, N, C) contiguous (read when HAS_NOISE and SAMPLE)
    EPS2,  # eps_flow: (B, N, C) contiguous (read when HAS_NOISE and NEED_DT)
    GZ,  # grad of z: (B, N, C) contiguous (read when HAS_GZ)
    GZT,  # grad of z_t: (B, N, C) contiguous (read when HAS_GZT)
    GKL,  # grad of kl: (B,) contiguous (read when HAS_GKL)
    DMOMENTS,  # out: (B, N, 2C) contiguous, dtype of moments
    DT_PART,  # out: (B, P) fp32 contiguous, partial sums of dL/dt (written when NEED_DT)
    N,
    C,
    P,
    seed_int: tl.int64,
    s_off: tl.int64,
    b_base: tl.int64,
    gamma,
    stride_mb,
    stride_mn,
    stride_mc,
    HAS_NOISE: tl.constexpr,
    SAMPLE: tl.constexpr,
    FLOW: tl.constexpr,
    HAS_GZ: tl.constexpr,
    HAS_GZT: tl.constexpr,
    HAS_GKL: tl.constexpr,
    NEED_DT: tl.constexpr,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b, n0, p, c, row, ok_e, ok_o, part = _pair_tile(b_base, N, C, BLOCK_P, BLOCK_C)
    m_base = b * stride_mb + n0.to(tl.int64) * stride_mn
    z_base = (b * N + n0) * C
    m_e = row[:, None] * stride_mn + c[None, :] * stride_mc
    z_e = row[:, None] * C + c[None, :]
    d_e = row[:, None] * (2 * C) + c[None, :]
    # eps_flow enters only dL/dt, eps_post only through the sample: with neither, no noise at all
    M = MOMENTS + m_base
    mean_e = tl.load(M + m_e, mask=ok_e, other=0.0)
    lv_e = tl.load(M + m_e + C * stride_mc, mask=ok_e, other=0.0)
    mean_o = tl.load(M + m_e + stride_mn, mask=ok_o, other=0.0)
    lv_o = tl.load(M + m_e + stride_mn + C * stride_mc, mask=ok_o, other=0.0)
    pe, po, fe, fo = _noise4(
        SEED,
        seed_int,
        s_off,
        EPS1 + z_base,
        EPS2 + z_base,
        b,
        p,
        c,
        z_e,
        z_e + C,
        ok_e,
        ok_o,
        mean_e,
        HAS_NOISE,
        SAMPLE,
        NEED_DT and FLOW,
        SEED_IN_PTR,
        ROUNDS,
        ACC,
    )
    tt = tl.load(T + b).to(ACC)
    if HAS_GKL:
        gkl = tl.load(GKL + b).to(ACC)
    else:
        gkl = 0.0
    D = DMOMENTS + 2 * z_base
    dt = _bwd_half(
        mean_e,
        lv_e,
        GZ + z_base,
        GZT + z_base,
        D,
        z_e,
        d_e,
        ok_e,
        C,
        1.0 - tt,
        gamma,
        gkl,
        pe,
        fe,
        HAS_GZ,
        HAS_GZT,
        HAS_GKL,
        SAMPLE,
        NEED_DT,
        ACC,
    )
    dt += _bwd_half(
        mean_o,
        lv_o,
        GZ + z_base,
        GZT + z_base,
        D,
        z_e + C,
        d_e + 2 * C,
        ok_o,
        C,
        1.0 - tt,
        gamma,
        gkl,
        po,
        fo,
        HAS_GZ,
        HAS_GZT,
        HAS_GKL,
        SAMPLE,
        NEED_DT,
        ACC,
    )
    if NEED_DT:
        tl.store(DT_PART + b * P + part, tl.sum(tl.sum(dt, axis=1), axis=0))


@triton.jit(do_not_specialize=_DNS)
def posterior_noise_kernel(
    SEED,  # seed: (1,) int64 (read when SEED_IN_PTR)
    EPS1,  # out eps_post: (B, N, C) contiguous
    EPS2,  # out eps_flow: (B, N, C) contiguous
    N,
    C,
    P,  # unused (keeps the tile helper's signature)
    seed_int: tl.int64,
    s_off: tl.int64,
    b_base: tl.int64,
    SEED_IN_PTR: tl.constexpr,
    ROUNDS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Materialise the (eps_post, eps_flow) that the fused kernels generate (``flow_noise``, tests)."""
    b, n0, p, c, row, ok_e, ok_o, part = _pair_tile(b_base, N, C, BLOCK_P, BLOCK_C)
    z_base = (b * N + n0) * C
    z_e = row[:, None] * C + c[None, :]
    k0, k1 = philox_key(SEED, seed_int, SEED_IN_PTR)
    s_lo, s_hi = sample_words(b + s_off)
    zero = (p[:, None] * 0 + c[None, :] * 0).to(tl.uint32)  # no load to follow: stores take the default layout
    pe, po, fe, fo = posterior_normals(k0, k1, s_lo, s_hi, p[:, None], c[None, :], zero, ROUNDS, True, True)
    ty = EPS1.dtype.element_ty
    tl.store(EPS1 + z_base + z_e, to_store(pe, ty), mask=ok_e)
    tl.store(EPS1 + z_base + z_e + C, to_store(po, ty), mask=ok_o)
    tl.store(EPS2 + z_base + z_e, to_store(fe, ty), mask=ok_e)
    tl.store(EPS2 + z_base + z_e + C, to_store(fo, ty), mask=ok_o)
