"""Triton kernels for the posterior sample + forward-flow interpolation + KL (SPEC §2).

Noise stream (shared with :mod:`rectok_fast.kernels.flow_matching`): for a seed ``s`` (int64, loaded
from memory so a new seed never recompiles) and an element index ``e`` (int64), one Philox-4x32-10
call with key ``s`` and counter ``(lo32(e), hi32(e), 0, 0)`` gives four 32-bit words ``(w0..w3)``;
``eps_a = BoxMuller(w0, w1)[0]`` and ``eps_b = BoxMuller(w2, w3)[0]`` (Triton's own
``uint_to_uniform_float`` / ``pair_uniform_to_normal``).  ``eps_a`` is bit-identical to
``tl.randn(s, e)`` and ``eps_b`` to ``tl.randn4x(s, e)[2]`` for ``e < 2**31``; the explicit
hi/lo split keeps the stream int64-safe and identical across Triton versions.

posterior_flow: element ``e = (b·N + n)·C + c``; ``eps1 = eps_a(e + E_OFF)`` (posterior sample),
``eps2 = eps_b(e + E_OFF)`` (flow noise), where ``E_OFF = sample_offset·N·C`` (int64) shifts the
counter to that of global sample ``b + sample_offset`` (a rank's slice of a global batch draws the
numbers of the whole batch's rows): two disjoint sets of Philox output words, one Philox call per
element.  One program handles a (BLOCK_N tokens × BLOCK_C channels) tile of one sample; per-sample
reductions (KL in the forward, dL/dt in the backward) are written as one fp32 partial per program
to a (B, P) buffer and summed by the launcher (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, philox, uint_to_uniform_float

LOGVAR_MIN: tl.constexpr = tl.constexpr(-30.0)
LOGVAR_MAX: tl.constexpr = tl.constexpr(20.0)


@triton.jit
def philox_normal2(seed, e):
    """Two independent N(0, 1) fp32 blocks for int64 element indices ``e`` (see module doc)."""
    lo = e.to(tl.uint32)
    hi = (e >> 32).to(tl.uint32)
    zero = lo * 0
    w0, w1, w2, w3 = philox(seed, lo, hi, zero, zero)
    a, _ = pair_uniform_to_normal(uint_to_uniform_float(w0), uint_to_uniform_float(w1))
    b, _ = pair_uniform_to_normal(uint_to_uniform_float(w2), uint_to_uniform_float(w3))
    return a, b


@triton.jit
def philox_normal(seed, e):
    """One N(0, 1) fp32 block for int64 element indices ``e``: ``eps_a`` of :func:`philox_normal2`."""
    lo = e.to(tl.uint32)
    hi = (e >> 32).to(tl.uint32)
    zero = lo * 0
    w0, w1, _, _ = philox(seed, lo, hi, zero, zero)
    a, _ = pair_uniform_to_normal(uint_to_uniform_float(w0), uint_to_uniform_float(w1))
    return a


@triton.jit
def normal_pair_kernel(
    SEED,  # seed: (1,) int64
    OUT_A,  # out: (numel,) contiguous, eps_a stream
    OUT_B,  # out: (numel,) contiguous, eps_b stream (unused when not TWO)
    numel,
    E_OFF,  # int64 counter offset: element i draws stream element E_OFF + i
    TWO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Materialise the noise stream for elements [E_OFF, E_OFF + numel) (tests, ``flow_noise``)."""
    pid = tl.program_id(0).to(tl.int64)
    e = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # (BLOCK,)
    ok = e < numel
    seed = tl.load(SEED)
    if TWO:
        a, b = philox_normal2(seed, e + E_OFF)
        tl.store(OUT_A + e, a.to(OUT_A.dtype.element_ty), mask=ok)
        tl.store(OUT_B + e, b.to(OUT_B.dtype.element_ty), mask=ok)
    else:
        a = philox_normal(seed, e + E_OFF)
        tl.store(OUT_A + e, a.to(OUT_A.dtype.element_ty), mask=ok)


@triton.jit
def _noise(SEED, EPS1, EPS2, e, E_OFF, ok, HAS_NOISE: tl.constexpr, SAMPLE: tl.constexpr, ACC: tl.constexpr):
    """(ε₁, ε₂) at element indices ``e`` in ACC: loaded (HAS_NOISE) or regenerated from the Philox
    stream at ``SEED`` and counters ``e + E_OFF``.  Without SAMPLE ε₁ is not needed: ε₂ stands in for it (never read)."""
    if HAS_NOISE:
        eps2 = tl.load(EPS2 + e, mask=ok, other=0.0).to(ACC)
        if SAMPLE:
            eps1 = tl.load(EPS1 + e, mask=ok, other=0.0).to(ACC)
        else:
            eps1 = eps2
    else:
        a, b = philox_normal2(tl.load(SEED), e + E_OFF)
        eps2 = b.to(ACC)
        if SAMPLE:
            eps1 = a.to(ACC)
        else:
            eps1 = eps2
    return eps1, eps2


@triton.jit
def _tile(pid0, pid1, N, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    n_blocks = tl.cdiv(N, BLOCK_N)
    b = pid0 // n_blocks
    nb = pid0 % n_blocks
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,)
    c = pid1 * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)  # (BLOCK_C,)
    ok = (n[:, None] < N) & (c[None, :] < C)  # (BLOCK_N, BLOCK_C)
    e = (b * N + n[:, None]) * C + c[None, :]  # (BLOCK_N, BLOCK_C) element index of z
    part = nb * tl.num_programs(1) + pid1  # partial-sum slot of this program within sample b
    return b, n, c, ok, e, part


@triton.jit
def posterior_flow_fwd_kernel(
    MOMENTS,  # moments: (B, N, 2C), strides (stride_mb, stride_mn, stride_mc)
    T,  # t: (B,) any float dtype, contiguous
    SEED,  # seed: (1,) int64 (read when not HAS_NOISE)
    EPS1,  # eps_post: (B, N, C) contiguous (read when HAS_NOISE and SAMPLE)
    EPS2,  # eps_flow: (B, N, C) contiguous (read when HAS_NOISE)
    Z,  # out z: (B, N, C) contiguous, dtype of moments
    ZT,  # out z_t: (B, N, C) contiguous, dtype of moments
    KL_PART,  # out: (B, P) fp32 contiguous, P = n_blocks · num_programs(1)
    N,
    C,
    P,
    E_OFF,  # int64 Philox counter offset: sample_offset·N·C
    gamma,
    stride_mb,
    stride_mn,
    stride_mc,
    HAS_NOISE: tl.constexpr,
    SAMPLE: tl.constexpr,
    ACC: tl.constexpr,  # compute dtype: tl.float32 (tl.float64 for fp64 inputs)
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid0 = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1).to(tl.int64)
    b, n, c, ok, e, part = _tile(pid0, pid1, N, C, BLOCK_N, BLOCK_C)
    m_ptr = MOMENTS + b * stride_mb + n[:, None] * stride_mn + c[None, :] * stride_mc
    mean = tl.load(m_ptr, mask=ok, other=0.0).to(ACC)
    lv = tl.load(m_ptr + C * stride_mc, mask=ok, other=0.0).to(ACC)
    lv = tl.minimum(tl.maximum(lv, LOGVAR_MIN), LOGVAR_MAX)
    var = tl.exp(lv)
    tt = tl.load(T + b).to(ACC)
    eps1, eps2 = _noise(SEED, EPS1, EPS2, e, E_OFF, ok, HAS_NOISE, SAMPLE, ACC)
    if SAMPLE:
        z = mean + tl.exp(0.5 * lv) * eps1
    else:
        z = mean
    # Same operation order as the reference: (1 - t)·z + (t·γ)·ε₂.
    zt = (1.0 - tt) * z + (tt * gamma) * eps2
    tl.store(Z + e, z.to(Z.dtype.element_ty), mask=ok)
    tl.store(ZT + e, zt.to(ZT.dtype.element_ty), mask=ok)
    kl = tl.where(ok, mean * mean + var - 1.0 - lv, 0.0).to(tl.float32)
    tl.store(KL_PART + b * P + part, 0.5 * tl.sum(tl.sum(kl, axis=1), axis=0))


@triton.jit
def posterior_flow_bwd_kernel(
    MOMENTS,  # moments: (B, N, 2C), strides (stride_mb, stride_mn, stride_mc)
    T,  # t: (B,) contiguous
    SEED,  # seed: (1,) int64 (read when not HAS_NOISE)
    EPS1,  # eps_post: (B, N, C) contiguous (read when HAS_NOISE and SAMPLE)
    EPS2,  # eps_flow: (B, N, C) contiguous (read when HAS_NOISE)
    GZ,  # grad of z: (B, N, C) contiguous
    GZT,  # grad of z_t: (B, N, C) contiguous
    GKL,  # grad of kl: (B,) contiguous
    DMOMENTS,  # out: (B, N, 2C) contiguous, dtype of moments
    DT_PART,  # out: (B, P) fp32 contiguous, partial sums of dL/dt
    N,
    C,
    P,
    E_OFF,  # int64 Philox counter offset: sample_offset·N·C
    gamma,
    stride_mb,
    stride_mn,
    stride_mc,
    HAS_NOISE: tl.constexpr,
    SAMPLE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid0 = tl.program_id(0).to(tl.int64)
    pid1 = tl.program_id(1).to(tl.int64)
    b, n, c, ok, e, part = _tile(pid0, pid1, N, C, BLOCK_N, BLOCK_C)
    m_ptr = MOMENTS + b * stride_mb + n[:, None] * stride_mn + c[None, :] * stride_mc
    mean = tl.load(m_ptr, mask=ok, other=0.0).to(ACC)
    lv_raw = tl.load(m_ptr + C * stride_mc, mask=ok, other=0.0).to(ACC)
    # torch.clamp's backward: the gradient passes where min <= x <= max (inclusive).
    pass_lv = (lv_raw >= LOGVAR_MIN) & (lv_raw <= LOGVAR_MAX)
    lv = tl.minimum(tl.maximum(lv_raw, LOGVAR_MIN), LOGVAR_MAX)
    tt = tl.load(T + b).to(ACC)
    gkl = tl.load(GKL + b).to(ACC)
    gz = tl.load(GZ + e, mask=ok, other=0.0).to(ACC)
    gzt = tl.load(GZT + e, mask=ok, other=0.0).to(ACC)
    eps1, eps2 = _noise(SEED, EPS1, EPS2, e, E_OFF, ok, HAS_NOISE, SAMPLE, ACC)
    dz = gz + (1.0 - tt) * gzt  # total gradient reaching z
    dmean = dz + gkl * mean
    dlv = 0.5 * gkl * (tl.exp(lv) - 1.0)
    if SAMPLE:
        std = tl.exp(0.5 * lv)
        z = mean + std * eps1
        dlv += dz * (0.5 * std * eps1)
    else:
        z = mean
    dlv = tl.where(pass_lv, dlv, 0.0)
    d_ptr = DMOMENTS + (b * N + n[:, None]) * (2 * C) + c[None, :]  # int64: b and n are int64
    tl.store(d_ptr, dmean.to(DMOMENTS.dtype.element_ty), mask=ok)
    tl.store(d_ptr + C, dlv.to(DMOMENTS.dtype.element_ty), mask=ok)
    dt = tl.where(ok, gzt * (gamma * eps2 - z), 0.0).to(tl.float32)  # dz_t/dt = γ·ε₂ − z
    tl.store(DT_PART + b * P + part, tl.sum(tl.sum(dt, axis=1), axis=0))
