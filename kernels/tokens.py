"""Triton kernels for MAE-style token selection: ``gather_tokens`` and ``restore_tokens``.

Every kernel is memory-safe for any index value (the launchers do not check index ranges, which
would sync with the host): ``gather_tokens`` reads an id outside [0, N) as a zero row (its gradient
goes nowhere); ``restore_tokens`` inserts the mask token for any id outside [0, K).

``gather_tokens``: ``out[b, k] = x[b, ids[b, k]] (+ pos[ids[b, k]])``.  ``x`` may be a table shared
by the batch (batch stride 0), e.g. RoPE rows.  One program per (b, tile of BLOCK_K tokens) streams
D in BLOCK_D chunks.

Its backward is a deterministic segment sum (no atomics): the launcher sorts the flat rows
``m = b*K + k`` of ``grad_out`` by destination row (stable sort) and builds CSR offsets; each program
owns BLOCK_R destination rows and adds their source rows in sorted order in fp32.  The same
kernel gives the per-batch ``grad_x``, the batch-summed gradient of a shared table and ``grad_pos``,
and duplicated ids accumulate correctly.

``restore_tokens``: ``out[b, i] = (visible[b, j] if j < K else mask_token) + pos[i]`` with
``j = ids_restore[b, i]``.  Its backward runs one program per (tile of BLOCK_N positions, tile of
BLOCK_D features) and loops over the batch: it scatters ``grad_out[b, i]`` to ``grad_visible[b, j]``
(``ids_restore`` is a permutation, so no two programs write the same row), sums the masked rows
into one fp32 partial per program (summed by the launcher: deterministic) and the batch into
``grad_pos`` in fp32 registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- rounding


@triton.jit
def _cast(x, DTYPE: tl.constexpr, RTNE_BF16: tl.constexpr):
    """``x.to(DTYPE)``; with ``RTNE_BF16`` a float -> bf16 cast rounds to nearest-even with integer
    ops.  The launcher sets it only under ``TRITON_INTERPRET=1``, whose bf16 cast truncates; compiled
    kernels round to nearest-even natively."""
    if RTNE_BF16 and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def _plus_pos(v, POS_PTRS, mask, HAS_POS: tl.constexpr, FP64: tl.constexpr):
    """``v + pos`` in fp64 (FP64) or fp32 with ``pos`` loaded from the (rows, BLOCK_D) pointer tile
    ``POS_PTRS``; ``v`` unchanged unless HAS_POS."""
    if HAS_POS:
        p = tl.load(POS_PTRS, mask=mask, other=0.0)
        if FP64:
            v = v.to(tl.float64) + p.to(tl.float64)
        else:
            v = v.to(tl.float32) + p.to(tl.float32)
    return v


# ----------------------------------------------------------------------------- gather


@triton.jit
def gather_tokens_fwd_kernel(
    X,  # x: (Bx, N, D), Bx in {B, 1}; strides (stride_xb, stride_xn, stride_xd), stride_xb = 0 if shared
    IDS,  # ids_keep: (B, K) int32/int64, strides (stride_ib, stride_ik)
    POS,  # pos: (N, D) strides (stride_pn, stride_pd); unused unless HAS_POS
    OUT,  # out: (B, K, D) contiguous
    K,
    N,  # rows of x: an id outside [0, N) reads a zero row (memory-safe for any id, no host check)
    D,
    n_kblocks,  # cdiv(K, BLOCK_K)
    stride_xb,
    stride_xn,
    stride_xd,
    stride_ib,
    stride_ik,
    stride_pn,
    stride_pd,
    HAS_POS: tl.constexpr,
    FP64: tl.constexpr,  # compute the pos add in fp64 (else fp32)
    RTNE_BF16: tl.constexpr,  # emulate round-to-nearest-even bf16 casts (interpreter only)
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_kblocks
    ks = (pid % n_kblocks) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)  # (BLOCK_K,)
    kmask = ks < K
    rows = tl.load(IDS + b * stride_ib + ks * stride_ik, mask=kmask, other=0).to(tl.int64)  # (BLOCK_K,)
    rvalid = (rows >= 0) & (rows < N)  # (BLOCK_K,)
    rows = tl.where(rvalid, rows, 0)  # no address arithmetic on a bad id
    x_row = X + b * stride_xb + rows[:, None] * stride_xn  # (BLOCK_K, 1)
    o_row = OUT + (b * K + ks)[:, None] * D  # (BLOCK_K, 1)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
        m = kmask[:, None] & (cols < D)[None, :]
        rm = m & rvalid[:, None]
        v = tl.load(x_row + cols[None, :] * stride_xd, mask=rm, other=0.0)
        v = _plus_pos(v, POS + rows[:, None] * stride_pn + cols[None, :] * stride_pd, rm, HAS_POS, FP64)
        tl.store(o_row + cols[None, :], _cast(v, OUT.dtype.element_ty, RTNE_BF16), mask=m)


@triton.jit
def segment_sum_rows_kernel(
    SRC,  # grad_out: (B, K, D), strides (stride_sb, stride_sk, stride_sd)
    ORDER,  # (B*K,) int64: flat source rows m = b*K + k, stably sorted by destination row
    OFFSETS,  # (R + 1,) int64: dst row r receives ORDER[OFFSETS[r]:OFFSETS[r+1]]
    DST,  # (R, D) contiguous, written entirely (rows without sources get 0)
    R,
    K,
    D,
    stride_sb,
    stride_sk,
    stride_sd,
    FP64: tl.constexpr,  # accumulate in fp64 (else fp32)
    RTNE_BF16: tl.constexpr,  # emulate round-to-nearest-even bf16 casts (interpreter only)
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # (BLOCK_R,)
    rmask = rows < R
    start = tl.load(OFFSETS + rows, mask=rmask, other=0)  # (BLOCK_R,)
    cnt = tl.load(OFFSETS + rows + 1, mask=rmask, other=0) - start  # (BLOCK_R,)
    max_cnt = tl.max(cnt, axis=0)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
    dmask = cols < D
    if FP64:
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for t in range(0, max_cnt):
        valid = (t < cnt) & rmask  # (BLOCK_R,)
        src = tl.load(ORDER + start + t, mask=valid, other=0)  # (BLOCK_R,)
        sb = src // K
        sk = src - sb * K
        g = tl.load(
            SRC + (sb * stride_sb + sk * stride_sk)[:, None] + cols[None, :] * stride_sd,
            mask=valid[:, None] & dmask[None, :],
            other=0.0,
        )
        acc += g.to(acc.dtype)
    tl.store(
        DST + rows[:, None] * D + cols[None, :],
        _cast(acc, DST.dtype.element_ty, RTNE_BF16),
        mask=rmask[:, None] & dmask[None, :],
    )


# ----------------------------------------------------------------------------- restore


@triton.jit
def restore_tokens_fwd_kernel(
    VIS,  # visible: (B, K, D), strides (stride_vb, stride_vk, stride_vd)
    IDS,  # ids_restore: (B, N) int32/int64, strides (stride_ib, stride_in)
    MT,  # mask_token: (D,), stride stride_m
    POS,  # pos: (N, D), strides (stride_pn, stride_pd); unused unless HAS_POS
    OUT,  # out: (B, N, D) contiguous
    K,
    N,
    D,
    n_nblocks,  # cdiv(N, BLOCK_N)
    stride_vb,
    stride_vk,
    stride_vd,
    stride_ib,
    stride_in,
    stride_m,
    stride_pn,
    stride_pd,
    HAS_POS: tl.constexpr,
    FP64: tl.constexpr,
    RTNE_BF16: tl.constexpr,  # emulate round-to-nearest-even bf16 casts (interpreter only)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_nblocks
    ns = (pid % n_nblocks) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,)
    nmask = ns < N
    j = tl.load(IDS + b * stride_ib + ns * stride_in, mask=nmask, other=0).to(tl.int64)  # (BLOCK_N,)
    vis = (j >= 0) & (j < K)  # any other id (>= K or out of range) takes the mask token
    j = tl.where(vis, j, 0)
    o_row = OUT + (b * N + ns)[:, None] * D  # (BLOCK_N, 1)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
        dmask = cols < D
        m = nmask[:, None] & dmask[None, :]
        v = tl.load(
            VIS + b * stride_vb + j[:, None] * stride_vk + cols[None, :] * stride_vd, mask=m & vis[:, None], other=0.0
        )
        # the reference casts the mask token to visible's dtype before inserting it
        mt = _cast(tl.load(MT + cols * stride_m, mask=dmask, other=0.0), VIS.dtype.element_ty, RTNE_BF16)  # (BLOCK_D,)
        v = tl.where(vis[:, None], v, mt[None, :])
        v = _plus_pos(v, POS + ns[:, None] * stride_pn + cols[None, :] * stride_pd, m, HAS_POS, FP64)
        tl.store(o_row + cols[None, :], _cast(v, OUT.dtype.element_ty, RTNE_BF16), mask=m)


@triton.jit
def restore_tokens_bwd_kernel(
    GO,  # grad_out: (B, N, D), strides (stride_gb, stride_gn, stride_gd)
    IDS,  # ids_restore: (B, N) int32/int64, strides (stride_ib, stride_in); a permutation per row
    GVIS,  # grad_visible: (B, K, D) contiguous, zero-initialised
    GMT_PART,  # (n_nblocks, D) fp32/fp64 contiguous: masked-row sums of each N tile
    GPOS,  # grad_pos: (N, D) contiguous; unused unless HAS_POS
    B,
    K,
    N,
    D,
    stride_gb,
    stride_gn,
    stride_gd,
    stride_ib,
    stride_in,
    HAS_POS: tl.constexpr,
    FP64: tl.constexpr,
    RTNE_BF16: tl.constexpr,  # emulate round-to-nearest-even bf16 casts (interpreter only)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,)
    nmask = ns < N
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)  # (BLOCK_D,)
    dmask = cols < D
    m = nmask[:, None] & dmask[None, :]
    if FP64:
        acc_mt = tl.zeros((BLOCK_D,), dtype=tl.float64)
        acc_pos = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float64)
    else:
        acc_mt = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_pos = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for b in range(0, B):
        j = tl.load(IDS + b * stride_ib + ns * stride_in, mask=nmask, other=0).to(tl.int64)  # (BLOCK_N,)
        vis = (j >= 0) & (j < K)  # as in the forward: other ids took the mask token
        j = tl.where(vis, j, 0)
        g = tl.load(GO + b * stride_gb + ns[:, None] * stride_gn + cols[None, :] * stride_gd, mask=m, other=0.0)
        tl.store(
            GVIS + (b * K + j)[:, None] * D + cols[None, :],
            _cast(g, GVIS.dtype.element_ty, RTNE_BF16),
            mask=m & vis[:, None],
        )
        ga = g.to(acc_pos.dtype)
        acc_mt += tl.sum(tl.where(vis[:, None], 0.0, ga), axis=0)
        if HAS_POS:
            acc_pos += ga
    tl.store(GMT_PART + pid_n * D + cols, acc_mt, mask=dmask)
    if HAS_POS:
        tl.store(GPOS + ns[:, None] * D + cols[None, :], _cast(acc_pos, GPOS.dtype.element_ty, RTNE_BF16), mask=m)
