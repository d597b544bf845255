"""Triton kernels for the Gaussian KL to N(0, I) and the softmax KL feature-alignment loss.

``gaussian_kl``: each sample's flattened row of L elements is split into ``n_split`` spans; the
program (b, s) reduces span s of row b into one fp32 partial (summed by the launcher, so the
result is deterministic).  The backward is elementwise over the same spans.

``kl_align``: rows are tokens, the softmax runs over the feature dim D.  One program per tile of
``BLOCK_M`` rows streams D in ``BLOCK_D`` chunks once, keeping an online softmax (running max and
sum) for the student and the teacher plus ``A = sum exp(t' - m_t) (t' - s')``, so that
``KL(p_t || p_s) = A / l_t - lse_t + lse_s``.  The forward stores, per row, each softmax's max and
log-sum apart (``lse = max + log l`` rounded to one fp32 would cost ~ulp(max) in every log-prob of
the backward when logits are large) and KL; the backward recomputes both softmaxes in one pass.
The launcher gives each row to one warp (``num_warps=1``), so the row reductions are warp shuffles.

NaN and Inf propagate as through the reference: the logvar clamp keeps NaN (``torch.clamp``) and
its gradient passes where ``lo <= logvar <= hi`` (bounds included, NaN excluded).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._rows import load_pair, row_tile, store_row_loss, weighted

# ----------------------------------------------------------------------------- gaussian KL


@triton.jit
def _clamp_nan(x, lo, hi):
    """``x`` clamped to [lo, hi] with NaN kept NaN (``torch.clamp``; ``tl.minimum``/``tl.maximum``
    would return the bound)."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def gaussian_kl_fwd_kernel(
    MEAN,  # mean: (B, L), any float dtype, strides (stride_mb, stride_ml)
    LOGVAR,  # logvar: (B, L), any float dtype, strides (stride_vb, stride_vl)
    PARTIAL,  # out: (B, n_split) fp32 contiguous
    L,
    span,  # elements per split (multiple of BLOCK)
    n_split,
    stride_mb,
    stride_ml,
    stride_vb,
    stride_vl,
    lo,
    hi,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK).to(tl.int64)  # (BLOCK,)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    start = s * span
    for k0 in range(0, span, BLOCK):
        i = start + k0 + offs
        ok = i < L
        m = tl.load(MEAN + b * stride_mb + i * stride_ml, mask=ok, other=0.0).to(tl.float32)
        lv = tl.load(LOGVAR + b * stride_vb + i * stride_vl, mask=ok, other=0.0).to(tl.float32)
        if CLAMP:
            lv = _clamp_nan(lv, lo, hi)
        term = m * m + tl.exp(lv) - 1.0 - lv
        acc += tl.where(ok, term, 0.0)
    tl.store(PARTIAL + b * n_split + s, 0.5 * tl.sum(acc, axis=0))


@triton.jit
def gaussian_kl_bwd_kernel(
    GRAD,  # grad of the (B,) output: (B,) fp32 contiguous
    MEAN,  # mean: (B, L), strides (stride_mb, stride_ml)
    LOGVAR,  # logvar: (B, L), strides (stride_vb, stride_vl)
    DMEAN,  # out: (B, L) contiguous, mean's dtype
    DLOGVAR,  # out: (B, L) contiguous, logvar's dtype
    L,
    span,
    stride_mb,
    stride_ml,
    stride_vb,
    stride_vl,
    lo,
    hi,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK).to(tl.int64)  # (BLOCK,)
    g = tl.load(GRAD + b).to(tl.float32)
    start = s * span
    for k0 in range(0, span, BLOCK):
        i = start + k0 + offs
        ok = i < L
        m = tl.load(MEAN + b * stride_mb + i * stride_ml, mask=ok, other=0.0).to(tl.float32)
        lv = tl.load(LOGVAR + b * stride_vb + i * stride_vl, mask=ok, other=0.0).to(tl.float32)
        if CLAMP:
            # the clamp passes the gradient where lo <= lv <= hi, bounds included (the project's
            # convention, written out in the reference); 0 outside and for NaN
            dlv = 0.5 * g * (tl.exp(_clamp_nan(lv, lo, hi)) - 1.0)
            dlv = tl.where((lv >= lo) & (lv <= hi), dlv, 0.0)
        else:
            dlv = 0.5 * g * (tl.exp(lv) - 1.0)
        tl.store(DMEAN + b * L + i, (g * m).to(DMEAN.dtype.element_ty), mask=ok)
        tl.store(DLOGVAR + b * L + i, dlv.to(DLOGVAR.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- softmax KL alignment


@triton.jit
def kl_align_fwd_kernel(
    S,  # student: (M, D), any float dtype, strides (stride_sm, stride_sd)
    T,  # teacher: (M, D), any float dtype, strides (stride_tm, stride_td)
    W,  # weight: (M,) fp32 contiguous (read only when HAS_WEIGHT)
    STATS,  # out: (M, 5) fp32 contiguous: max(s/T), max(t/T), KL(p_t || p_s), log Σexp(s/T - max), log Σexp(t/T - max)
    ROWLOSS,  # out: (M,) fp32 contiguous, T^2 * KL * weight
    M,
    D,
    stride_sm,
    stride_sd,
    stride_tm,
    stride_td,
    inv_temp,
    temp_sq,
    HAS_WEIGHT: tl.constexpr,
    EVEN_D: tl.constexpr,  # D % BLOCK_D == 0: no column masks
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Online softmax over D chunks in the inputs' own units: the running maxima are of the raw
    rows (T > 0 commutes with max), exponentials are ``exp2((x - max) * log2(e) / T)``, and
    ``A = Σ exp(t/T - m_t)·(t - s)`` is scaled by 1/T once at the end.  Rows past M are read as
    row M - 1 (no row masks on loads) and not stored.  The launcher sizes the tile so that a row
    lives in one warp: every reduction is a warp shuffle, never a shared-memory round trip."""
    rows, row_ok, cols = row_tile(M, BLOCK_M, BLOCK_D)  # (BLOCK_M,), (BLOCK_M,), (BLOCK_D,)
    rows_ld = tl.minimum(rows, M - 1)
    c2 = inv_temp * 1.4426950408889634  # log2(e) / T
    m_s = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    l_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        if EVEN_D:
            s = tl.load(S + rows_ld[:, None] * stride_sm + c[None, :] * stride_sd).to(tl.float32)
            t = tl.load(T + rows_ld[:, None] * stride_tm + c[None, :] * stride_td).to(tl.float32)
        else:
            col_ok = (c < D)[None, :]
            # padded columns: -inf for the maxima and the sums (exp2(-inf) = 0), masked out of A below
            s = tl.load(S + rows_ld[:, None] * stride_sm + c[None, :] * stride_sd, mask=col_ok, other=float("-inf"))
            t = tl.load(T + rows_ld[:, None] * stride_tm + c[None, :] * stride_td, mask=col_ok, other=float("-inf"))
            s = s.to(tl.float32)
            t = t.to(tl.float32)
        ms_new = tl.maximum(m_s, tl.max(s, axis=1))
        mt_new = tl.maximum(m_t, tl.max(t, axis=1))
        e_s = tl.exp2((s - ms_new[:, None]) * c2)
        e_t = tl.exp2((t - mt_new[:, None]) * c2)
        alpha_t = tl.exp2((m_t - mt_new) * c2)
        l_s = l_s * tl.exp2((m_s - ms_new) * c2) + tl.sum(e_s, axis=1)
        l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
        a = e_t * (t - s)
        if not EVEN_D:
            a = tl.where(col_ok, a, 0.0)
        acc = acc * alpha_t + tl.sum(a, axis=1)
        m_s = ms_new
        m_t = mt_new
    m_s = m_s * inv_temp
    m_t = m_t * inv_temp
    log_l_s = tl.log(l_s)
    log_l_t = tl.log(l_t)
    kl = (acc * inv_temp) / l_t - (m_t - m_s) - (log_l_t - log_l_s)
    loss = kl * temp_sq
    # stats row: (m_s, m_t, KL, log l_s, log l_t)
    store_row_loss(ROWLOSS, STATS, W, rows, row_ok, loss, m_s, m_t, kl, HAS_WEIGHT, 5)
    tl.store(STATS + rows * 5 + 3, log_l_s, mask=row_ok)
    tl.store(STATS + rows * 5 + 4, log_l_t, mask=row_ok)


@triton.jit
def kl_align_bwd_kernel(
    S,  # student: (M, D), strides (stride_sm, stride_sd)
    T,  # teacher: (M, D), strides (stride_tm, stride_td)
    W,  # weight: (M,) fp32 contiguous (read only when HAS_WEIGHT)
    STATS,  # from the forward: (M, 5) fp32 contiguous (see the forward)
    SCALE,  # 0-dim fp32: grad_loss / count
    DS,  # out dstudent: (M, D) contiguous, student's dtype
    DT,  # out dteacher: (M, D) contiguous, teacher's dtype (written only when GRAD_TARGET)
    M,
    D,
    stride_sm,
    stride_sd,
    stride_tm,
    stride_td,
    inv_temp,
    temp,
    HAS_WEIGHT: tl.constexpr,
    GRAD_TARGET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows, row_ok, cols = row_tile(M, BLOCK_M, BLOCK_D)  # (BLOCK_M,), (BLOCK_M,), (BLOCK_D,)
    m_s = tl.load(STATS + rows * 5, mask=row_ok, other=0.0)
    m_t = tl.load(STATS + rows * 5 + 1, mask=row_ok, other=0.0)
    log_l_s = tl.load(STATS + rows * 5 + 3, mask=row_ok, other=0.0)
    log_l_t = tl.load(STATS + rows * 5 + 4, mask=row_ok, other=0.0)
    # d(T^2 KL)/ds = T (p_s - p_t);  d(T^2 KL)/dt = T p_t (log p_t - log p_s - KL)
    coef = weighted(tl.where(row_ok, tl.load(SCALE).to(tl.float32) * temp, 0.0), W, rows, row_ok, HAS_WEIGHT)
    if GRAD_TARGET:
        # dteacher_i = T p_t,i (L_i - KL), L = log p_t - log p_s.  When the KL is large, L_i - KL
        # cancels almost exactly at the dominant entries and fp32 rounding of KL (~ulp(KL)) would
        # dominate.  Centre on c = L at the teacher's argmax: L_i - KL = (L_i - c) - Σ_j p_j (L_j - c)
        # (Σ p = 1), where the dominant term is exactly 0 and the rest are small.  Two extra passes,
        # only when the teacher's gradient is asked for.
        cen = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            msk = row_ok[:, None] & (c < D)[None, :]  # (BLOCK_M, BLOCK_D)
            s, t = load_pair(S, T, rows, c, msk, stride_sm, stride_sd, stride_tm, stride_td)
            lr = ((t * inv_temp - m_t[:, None]) - log_l_t[:, None]) - ((s * inv_temp - m_s[:, None]) - log_l_s[:, None])
            cen = tl.maximum(cen, tl.max(tl.where(msk & (t * inv_temp == m_t[:, None]), lr, float("-inf")), axis=1))
        # a non-finite centre (an infinite log-ratio at the teacher's argmax) would turn every entry
        # NaN; centring on 0 there gives the reference's uncentred NaN/Inf pattern
        cen = tl.where(row_ok & (tl.abs(cen) < float("inf")), cen, 0.0)
        kl = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols
            msk = row_ok[:, None] & (c < D)[None, :]  # (BLOCK_M, BLOCK_D)
            s, t = load_pair(S, T, rows, c, msk, stride_sm, stride_sd, stride_tm, stride_td)
            log_ps = (s * inv_temp - m_s[:, None]) - log_l_s[:, None]
            log_pt = (t * inv_temp - m_t[:, None]) - log_l_t[:, None]
            kl += tl.sum(tl.where(msk, tl.exp(log_pt) * ((log_pt - log_ps) - cen[:, None]), 0.0), axis=1)
    for d0 in range(0, D, BLOCK_D):
        c = d0 + cols
        msk = row_ok[:, None] & (c < D)[None, :]  # (BLOCK_M, BLOCK_D)
        s, t = load_pair(S, T, rows, c, msk, stride_sm, stride_sd, stride_tm, stride_td)
        log_ps = (s * inv_temp - m_s[:, None]) - log_l_s[:, None]
        log_pt = (t * inv_temp - m_t[:, None]) - log_l_t[:, None]
        p_t = tl.exp(log_pt)
        ds = coef[:, None] * (tl.exp(log_ps) - p_t)
        tl.store(DS + rows[:, None] * D + c[None, :], ds.to(DS.dtype.element_ty), mask=msk)
        if GRAD_TARGET:
            dt = coef[:, None] * p_t * (((log_pt - log_ps) - cen[:, None]) - kl[:, None])
            tl.store(DT + rows[:, None] * D + c[None, :], dt.to(DT.dtype.element_ty), mask=msk)
