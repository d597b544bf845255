"""Triton kernels for the distance-matrix alignment loss
``mean over b, i, j of relu(|cos(s_i, s_j) - cos(t_i, t_j)| - margin)``.

Inputs are the raw rows ``S`` (B, N, D) and ``T`` (B, N, Dt); rows are never normalised in memory:
a cosine tile is ``(S_I S_Jᵀ) · r_I r_Jᵀ`` with ``r = 1/max(norm, eps)``, the Gram tile computed by
``tl.dot`` over D in ``BLOCK_D`` chunks (fp32 accumulation).  No B·N² matrix is ever written:

* forward: one program per (i-tile, j-tile, sample); tiles with j < i are skipped and those with
  j > i count twice (both cosine matrices are symmetric); each program writes one fp32 partial sum
  (no atomics, so the result is deterministic).  The row norms are summed from the tiles the dots
  read (no separate pass over the inputs) and the diagonal tiles write them (B, N) for the backward;
* backward: with ``G = sign(d)·[|d| > margin]`` (``d = cos_s − cos_t``, symmetric), the gradient
  of the normalised rows is ``dŜ_I = 2·scale·Σ_J G_IJ Ŝ_J`` (``tl.dot`` again), then through the
  normalisation ``dS_i = r_i (dŜ_i − [norm_i ≥ eps]·ŝ_i (ŝ_i·dŜ_i))``, where ``ŝ_i·dŜ_i`` is
  ``2·scale·Σ_j G_ij cos_s[i, j]``, a row sum of the cosine tiles.  Programs are persistent (a fixed
  grid loops over the (sample, i-tile) work items).  Pass 1 of a work item computes the cosine tiles
  of its rows against every j-tile and writes the weights ``G_IJ r_J`` (``BLOCK_I × N``, in the
  input dtype: what the tensor cores take) to the program's slice of a scratch buffer; pass 2 walks
  D in chunks, ``tl.dot``-ing the weights with the raw j rows into a register accumulator, and writes
  the gradient.  The scratch is ``programs × BLOCK_I × N`` whatever B and D are.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` (fp32 accumulation).  UPCAST (set by the launcher for bf16 under the CPU
    interpreter, whose ``tl.dot`` multiplies bf16's raw bits) computes in fp32: bf16 products are
    exact in fp32, as on the tensor cores."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _gram_tile(
    X,  # base pointer of one sample: (N, K) rows, strides (stride_n, stride_k)
    rows_i,  # (BLOCK_I,) int64
    rows_j,  # (BLOCK_J,) int64
    ok_i,
    ok_j,
    K,
    stride_n,
    stride_k,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    NORMS: tl.constexpr,
):
    """(X_I X_Jᵀ (BLOCK_I, BLOCK_J), ‖x_i‖² (BLOCK_I,), ‖x_j‖² (BLOCK_J,)) in fp32, 0 outside the valid
    rows.  The squared norms (only when NORMS, else zeros) come from the tiles the dot reads anyway."""
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    ss_i = tl.zeros((BLOCK_I,), dtype=tl.float32)
    ss_j = tl.zeros((BLOCK_J,), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        a = tl.load(
            X + rows_i[:, None] * stride_n + k[None, :] * stride_k, mask=ok_i[:, None] & k_ok[None, :], other=0.0
        )
        bt = tl.load(
            X + rows_j[None, :] * stride_n + k[:, None] * stride_k, mask=k_ok[:, None] & ok_j[None, :], other=0.0
        )
        acc = _dot(a, bt, acc, PREC, UPCAST)
        if NORMS:
            a32 = a.to(tl.float32)
            b32 = bt.to(tl.float32)
            ss_i += tl.sum(a32 * a32, axis=1)
            ss_j += tl.sum(b32 * b32, axis=0)
    return acc, ss_i, ss_j


@triton.jit
def _inv(n, eps):
    """1/max(norm, eps) (NaN norms stay NaN, as torch's clamp_min)."""
    return 1.0 / tl.maximum(n, eps, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _inv_norm(NRM, rows, ok, eps):
    """(norm, 1/max(norm, eps)) of ``rows`` read from the saved norms."""
    n = tl.load(NRM + rows, mask=ok, other=1.0)
    return n, _inv(n, eps)


@triton.jit
def _cos_tiles(
    S,
    T,
    NS,
    NT,
    rows_i,
    rows_j,
    ok_i,
    ok_j,
    rs_i,
    rt_i,
    N,
    D,
    DT,
    stride_sn,
    stride_sd,
    stride_tn,
    stride_td,
    eps,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    PREC_S: tl.constexpr,
    PREC_T: tl.constexpr,
    UPCAST_S: tl.constexpr,
    UPCAST_T: tl.constexpr,
    SAVED_NORMS: tl.constexpr,
):
    """(cos_s tile, cos_t tile (BLOCK_I, BLOCK_J), r_s and r_t of the j rows, norms of the i rows); the
    norms come from ``NS``/``NT`` when ``SAVED_NORMS``, else from the tiles."""
    gs, ss_i, ss_j = _gram_tile(
        S,
        rows_i,
        rows_j,
        ok_i,
        ok_j,
        D,
        stride_sn,
        stride_sd,
        BLOCK_I,
        BLOCK_J,
        BLOCK_D,
        PREC_S,
        UPCAST_S,
        not SAVED_NORMS,
    )
    gt, tt_i, tt_j = _gram_tile(
        T,
        rows_i,
        rows_j,
        ok_i,
        ok_j,
        DT,
        stride_tn,
        stride_td,
        BLOCK_I,
        BLOCK_J,
        BLOCK_DT,
        PREC_T,
        UPCAST_T,
        not SAVED_NORMS,
    )
    if SAVED_NORMS:
        _, rs_j = _inv_norm(NS, rows_j, ok_j, eps)
        _, rt_j = _inv_norm(NT, rows_j, ok_j, eps)
        ns_i = rs_i
        nt_i = rt_i
    else:
        ns_i = tl.sqrt(ss_i)
        nt_i = tl.sqrt(tt_i)
        rs_i = _inv(ns_i, eps)
        rt_i = _inv(nt_i, eps)
        rs_j = _inv(tl.sqrt(ss_j), eps)
        rt_j = _inv(tl.sqrt(tt_j), eps)
    cs = gs * (rs_i[:, None] * rs_j[None, :])
    ct = gt * (rt_i[:, None] * rt_j[None, :])
    return cs, ct, rs_j, rt_j, ns_i, nt_i


@triton.jit
def distmat_fwd_kernel(
    S,  # student: (B, N, D), any float dtype, strides (stride_sb, stride_sn, stride_sd)
    T,  # teacher: (B, N, Dt), any float dtype, strides (stride_tb, stride_tn, stride_td)
    NS,  # out student row norms: (B, N) fp32 contiguous (written by the diagonal tiles)
    NT,  # out teacher row norms: (B, N) fp32 contiguous
    PART,  # out partial sums: (B, n_tiles, n_tiles) fp32 contiguous
    N,
    D,
    DT,
    stride_sb,
    stride_sn,
    stride_sd,
    stride_tb,
    stride_tn,
    stride_td,
    margin,
    eps,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    PREC_S: tl.constexpr,
    PREC_T: tl.constexpr,
    UPCAST_S: tl.constexpr,
    UPCAST_T: tl.constexpr,
):
    pid_i = tl.program_id(0).to(tl.int64)
    pid_j = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    partial = 0.0
    if pid_j >= pid_i:
        rows_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I).to(tl.int64)
        rows_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J).to(tl.int64)
        ok_i = rows_i < N
        ok_j = rows_j < N
        cs, ct, _, _, ns_i, nt_i = _cos_tiles(
            S + b * stride_sb, T + b * stride_tb, NS, NT,
            rows_i, rows_j, ok_i, ok_j, 0.0, 0.0, N, D, DT,
            stride_sn, stride_sd, stride_tn, stride_td, eps,
            BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_DT, PREC_S, PREC_T, UPCAST_S, UPCAST_T, False,
        )  # fmt: skip
        if pid_j == pid_i:  # the norms are a by-product of the tiles: one program per row writes them
            tl.store(NS + b * N + rows_i, ns_i, mask=ok_i)
            tl.store(NT + b * N + rows_i, nt_i, mask=ok_i)
        x = tl.abs(cs - ct) - margin
        term = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.relu
        term = tl.where(ok_i[:, None] & ok_j[None, :], term, 0.0)
        partial = tl.sum(tl.sum(term, axis=1), axis=0) * tl.where(pid_j > pid_i, 2.0, 1.0)
    tl.store(PART + (b * tl.num_programs(0) + pid_i) * tl.num_programs(1) + pid_j, partial)


@triton.jit
def _row_gradient(
    W,  # this program's weights: (BLOCK_I, N_PAD) in X's dtype, W_ij = G_ij r_j (0 past N)
    X,  # one sample's rows: (N, K), strides (stride_n, stride_k)
    DX,  # out: one sample's gradient (N, K) contiguous, X's dtype
    rows_i,
    ok_i,
    n_i,  # (BLOCK_I,) fp32 norms
    r_i,  # (BLOCK_I,) fp32 1/max(norm, eps)
    p_i,  # (BLOCK_I,) fp32 Σ_j G_ij cos_ij = x̂_i · Σ_j G_ij x̂_j
    coef,  # fp32 scalar: 2 · grad / (B N²), sign included
    eps,
    N,
    N_PAD,
    K,
    stride_n,
    stride_k,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """DX_i = coef · r_i (Σ_j W_ij x_j − [n_i ≥ eps] r_i p_i x_i), one BLOCK_K chunk of the row at a time.

    That is ``d/dx_i`` of the normalisation ``x̂ = x / max(‖x‖, eps)`` applied to ``dx̂_i = coef Σ_j G_ij x̂_j``:
    ``r_i (dx̂_i − x̂_i (x̂_i · dx̂_i))``, where ``x̂_i · dx̂_i = coef p_i`` comes from the cosine tiles, so
    the row-wide dot product needs no second pass (a norm clamped at eps has no gradient)."""
    ii = tl.arange(0, BLOCK_I).to(tl.int64)
    jj = tl.arange(0, BLOCK_J).to(tl.int64)
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    proj = tl.where(n_i >= eps, r_i * p_i, 0.0)
    cr = coef * r_i
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        acc = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
        for j0 in range(0, N, BLOCK_J):
            rows_j = j0 + jj
            w = tl.load(W + ii[:, None] * N_PAD + rows_j[None, :])
            xj = tl.load(
                X + rows_j[:, None] * stride_n + k[None, :] * stride_k,
                mask=(rows_j < N)[:, None] & k_ok[None, :],
                other=0.0,
            )
            acc = _dot(w, xj, acc, PREC, UPCAST)
        msk = ok_i[:, None] & k_ok[None, :]
        xi = tl.load(X + rows_i[:, None] * stride_n + k[None, :] * stride_k, mask=msk, other=0.0).to(tl.float32)
        dx = cr[:, None] * (acc - proj[:, None] * xi)
        tl.store(DX + rows_i[:, None] * K + k[None, :], dx.to(DX.dtype.element_ty), mask=msk)


# B (a last, smaller batch) is a loop bound only: never a reason to recompile
@triton.jit(do_not_specialize=["B"])
def distmat_bwd_kernel(
    S,  # student: (B, N, D), strides (stride_sb, stride_sn, stride_sd)
    T,  # teacher: (B, N, Dt), strides (stride_tb, stride_tn, stride_td)
    NS,  # student row norms: (B, N) fp32 contiguous
    NT,  # teacher row norms: (B, N) fp32 contiguous
    SCALE,  # 0-dim fp32: 2 · grad_loss / (B N²)
    WS,  # scratch: (programs, BLOCK_I, N_PAD) in the student's dtype
    WT,  # scratch: (programs, BLOCK_I, N_PAD) in the teacher's dtype (used only when GRAD_TARGET)
    DS,  # out dstudent: (B, N, D) contiguous, student's dtype
    DTG,  # out dteacher: (B, N, Dt) contiguous, teacher's dtype (written only when GRAD_TARGET)
    B,
    N,
    N_PAD,  # N rounded up to BLOCK_J
    D,
    DT,
    stride_sb,
    stride_sn,
    stride_sd,
    stride_tb,
    stride_tn,
    stride_td,
    margin,
    eps,
    GRAD_TARGET: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    PREC_S: tl.constexpr,
    PREC_T: tl.constexpr,
    UPCAST_S: tl.constexpr,
    UPCAST_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0)
    n_i_tiles = tl.cdiv(N, BLOCK_I)
    ii = tl.arange(0, BLOCK_I).to(tl.int64)
    w_s = WS + pid * BLOCK_I * N_PAD
    w_t = WT + pid * BLOCK_I * N_PAD
    coef = tl.load(SCALE).to(tl.float32)
    for item in range(pid, B * n_i_tiles, nprog):
        b = item // n_i_tiles
        rows_i = (item % n_i_tiles) * BLOCK_I + ii
        ok_i = rows_i < N
        s_b = S + b * stride_sb
        t_b = T + b * stride_tb
        ns_i, rs_i = _inv_norm(NS + b * N, rows_i, ok_i, eps)
        nt_i, rt_i = _inv_norm(NT + b * N, rows_i, ok_i, eps)
        # pass 1: G_IJ = sign(d)·[|d| > margin] for every j-tile -> weights W_IJ = G_IJ r_J (scratch) and
        # the projections p_i = Σ_j G_ij cos_ij
        p_s = tl.zeros((BLOCK_I,), dtype=tl.float32)
        p_t = tl.zeros((BLOCK_I,), dtype=tl.float32)
        for j0 in range(0, N, BLOCK_J):
            rows_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
            ok_j = rows_j < N
            cs, ct, rs_j, rt_j, _, _ = _cos_tiles(
                s_b, t_b, NS + b * N, NT + b * N,
                rows_i, rows_j, ok_i, ok_j, rs_i, rt_i, N, D, DT,
                stride_sn, stride_sd, stride_tn, stride_td, eps,
                BLOCK_I, BLOCK_J, BLOCK_D, BLOCK_DT, PREC_S, PREC_T, UPCAST_S, UPCAST_T, True,
            )  # fmt: skip
            d = cs - ct
            # d relu(|d| - m) / d d = sign(d) where |d| - m > 0, 0 at NaN (torch: relu'(NaN) = sign(NaN) = 0);
            # NaN rows still reach the gradient through r_J, cos and the rows themselves, as in the reference
            g = tl.where(tl.abs(d) - margin > 0.0, tl.where(d > 0.0, 1.0, -1.0), 0.0)
            g = tl.where(ok_i[:, None] & ok_j[None, :], g, 0.0)
            w_ptr = ii[:, None] * N_PAD + rows_j[None, :]
            p_s += tl.sum(g * cs, axis=1)
            tl.store(w_s + w_ptr, (g * rs_j[None, :]).to(WS.dtype.element_ty))  # ŝ_J = r_J s_J: raw rows later
            if GRAD_TARGET:
                p_t += tl.sum(g * ct, axis=1)
                tl.store(w_t + w_ptr, (g * rt_j[None, :]).to(WT.dtype.element_ty))
        # the weights are read back by other threads of this program: make the stores visible
        tl.debug_barrier()
        # pass 2: dS_I = coef r_I (W_I: S − r_I p_I S_I), chunk by chunk of D (and the teacher with −coef)
        _row_gradient(w_s, s_b, DS + b * N * D, rows_i, ok_i, ns_i, rs_i, p_s, coef, eps, N, N_PAD, D,
                      stride_sn, stride_sd, BLOCK_I, BLOCK_J, BLOCK_D, PREC_S, UPCAST_S)  # fmt: skip
        if GRAD_TARGET:
            _row_gradient(w_t, t_b, DTG + b * N * DT, rows_i, ok_i, nt_i, rt_i, p_t, -coef, eps, N, N_PAD, DT,
                          stride_tn, stride_td, BLOCK_I, BLOCK_J, BLOCK_DT, PREC_T, UPCAST_T)  # fmt: skip
        tl.debug_barrier()  # the scratch is overwritten by this program's next work item
