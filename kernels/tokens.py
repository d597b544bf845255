"""Triton kernels for MAE-style token selection: ``gather_tokens`` and ``restore_tokens``.

Every kernel is memory-safe for any index value (the launchers do not check index ranges, which
would sync with the host): ``gather_tokens`` reads an id outside [0, N) as a zero row (its gradient
goes nowhere); ``restore_tokens`` inserts the mask token for any id outside [0, K).

``gather_tokens``: ``out[b, k] = x[b, ids[b, k]] (+ pos[ids[b, k]])``.  ``x`` may be a table shared
by the batch (batch stride 0), e.g. RoPE rows.  One program per (b, tile of BLOCK_K tokens) streams
D in BLOCK_D chunks.

Backwards (deterministic: no atomics, no sort, fixed summation orders): ``token_links_kernel``
links, per batch row, the sources of every destination row in increasing order (``FIRST``: the
first source, ``NEXT``: the next one; for a permutation ``FIRST`` is the inverse permutation and
every chain has length one).  ``gather_tokens_bwd_kernel`` is then an inverse-permutation gather
over (row tile, feature tile, group of batch rows) that writes every destination row (zeros where
no id points) and/or sums the group's batch rows in fp32 registers (shared tables, ``pos``); the
launcher sums the groups' partials in a fixed order.  Duplicated ids walk their chain.

``restore_tokens``: ``out[b, i] = (visible[b, j] if j < K else mask_token) + pos[i]`` with
``j = ids_restore[b, i]``.  ``restore_tokens_bwd_kernel`` reads ``grad_out`` once, over (position
tile, feature tile, group of batch rows): ``grad_visible[b, j]`` from the first position of id j
(plus its duplicates' rows: only a non-permutation has any), zero rows where no position takes a
visible token, and fp32 register sums of the masked rows and of the batch (``pos``), reduced
across rows once per program.  Exact for any ids, like the reference's gather.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Integer arguments that follow the number of kept tokens K (a new mask ratio every step) are not
# specialised (``do_not_specialize``), so a new K never compiles a new variant.

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


@triton.jit(do_not_specialize=["K", "n_kblocks", "stride_ib"])
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


@triton.jit(do_not_specialize=["L", "R", "stride_ib"])
def token_links_kernel(
    IDS,  # ids: (B, L) int32/int64, strides (stride_ib, stride_il); entries outside [0, R) have no destination
    FIRST,  # (B, R) int32 contiguous, written entirely: smallest l with ids[b, l] == r, else -1
    NEXT,  # (B, L) int32 contiguous, written entirely: next l' > l with ids[b, l'] == ids[b, l], else -1
    FLAGS,  # (B,) int32: bit 0 = row b repeats a destination (some NEXT >= 0); bit 1 = some
    #         destination in [0, R) has no source (FIRST has a -1).  0: the row is a permutation of 0..R-1.
    L,
    R,
    stride_ib,
    stride_il,
    SHIFT: tl.constexpr,  # log2(BLOCK_L): a key is (destination << SHIFT) | source
    KEY64: tl.constexpr,  # int64 keys when (R + 1) << SHIFT does not fit in int32
    BLOCK_L: tl.constexpr,  # next_power_of_2(L): one program sorts a whole row
    BLOCK_R: tl.constexpr,  # chunk of FIRST cleared per step
):
    """Per batch row, link the sources of every destination in increasing order (a CSR without a
    global sort): sort the row's (destination, source) keys in registers and compare neighbours.

    For a permutation ``FIRST`` is the inverse permutation and ``NEXT`` is all -1.  Duplicated ids
    chain up in increasing source order, so walking a chain sums them in the order a stable sort
    would (deterministic, no atomics).  One program per row: O(L log^2 L) work.
    """
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_L)  # (BLOCK_L,) int32
    pmask = p < L
    ids = tl.load(IDS + b * stride_ib + p * stride_il, mask=pmask, other=-1)
    valid = pmask & (ids >= 0) & (ids < R)
    if KEY64:
        kt: tl.constexpr = tl.int64
    else:
        kt: tl.constexpr = tl.int32
    dst = tl.where(valid, ids, R).to(kt)  # no destination: sorted after every real one
    keys = tl.sort((dst << SHIFT) | p.to(kt))
    kd = keys >> SHIFT  # destinations, ascending
    ks = (keys & (BLOCK_L - 1)).to(tl.int32)  # their sources, ascending within a destination
    nb = tl.gather(keys, tl.minimum(p + 1, BLOCK_L - 1), 0)
    pv = tl.gather(keys, tl.maximum(p - 1, 0), 0)
    same_next = (p + 1 < BLOCK_L) & ((nb >> SHIFT) == kd) & (kd < R)
    first = ((p == 0) | ((pv >> SHIFT) != kd)) & (kd < R)
    tl.store(NEXT + b * L + ks, tl.where(same_next, (nb & (BLOCK_L - 1)).to(tl.int32), -1), mask=ks < L)
    n_first = tl.sum(first.to(tl.int32), axis=0)
    tl.store(FLAGS + b, tl.max(same_next.to(tl.int32), axis=0) | tl.where(n_first < R, 2, 0))
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        tl.store(FIRST + b * R + r, tl.full((BLOCK_R,), -1, tl.int32), mask=r < R)
    tl.debug_barrier()  # the clears above land before the scatter below (same program)
    tl.store(FIRST + b * R + tl.where(first, kd, 0), ks, mask=first)


@triton.jit
def _walk_chains(v, GO_B, k, NEXT_B, cols, dmask, stride_k, stride_d):
    """Add to ``v`` (BLOCK, BLOCK_D) the rows ``GO_B[k]`` along the chains ``k -> NEXT_B[k] -> ...``
    until -1 (rows with ``k < 0`` add nothing): the duplicates of a non-permutation."""
    while tl.max(k, axis=0) >= 0:
        live = k >= 0
        ks = tl.where(live, k, 0).to(tl.int64)
        g = tl.load(
            GO_B + ks[:, None] * stride_k + cols[None, :] * stride_d, mask=live[:, None] & dmask[None, :], other=0.0
        )
        v += g.to(v.dtype)
        k = tl.load(NEXT_B + ks, mask=live, other=-1)
    return v


@triton.jit
def _next_flagged(FLAGS, b0, b1, prev, MASK: tl.constexpr, BLOCK_B: tl.constexpr):
    """The smallest batch row in (prev, b1) with ``FLAGS[row] & MASK``, else b1 (rows >= b0)."""
    best = b1
    for c0 in range(b0, b1, BLOCK_B):
        idx = c0 + tl.arange(0, BLOCK_B)
        fl = tl.load(FLAGS + idx, mask=idx < b1, other=0)
        cand = (idx > prev) & ((fl & MASK) != 0)
        best = tl.minimum(best, tl.min(tl.where(cand, idx, b1), axis=0))
    return best


@triton.jit(do_not_specialize=["K"])
def gather_tokens_bwd_kernel(
    GO,  # grad_out: (B, K, D), strides (stride_gb, stride_gk, stride_gd)
    FIRST,  # (B, R) int32: first source k of each destination row, -1 if none (token_links_kernel)
    NEXT,  # (B, K) int32: next source with the same destination, -1 at the end of a chain
    FLAGS,  # (B,) int32: bit 0 set if row b has duplicated ids (token_links_kernel)
    DST,  # (B, R, D) contiguous, written entirely (rows without sources get 0); unused unless PER_BATCH
    PART,  # (G, R, D) fp32/fp64 contiguous: batch sums of each group of rows b; unused unless SUM_BATCH
    B,
    K,
    R,
    D,
    b_per_group,  # batch rows per program along axis 2 (G = cdiv(B, b_per_group))
    stride_gb,
    stride_gk,
    stride_gd,
    PER_BATCH: tl.constexpr,  # write the per-batch gradient DST[b] (x of batch B)
    SUM_BATCH: tl.constexpr,  # write the group's batch sum (a shared table, pos)
    FP64: tl.constexpr,
    RTNE_BF16: tl.constexpr,  # emulate round-to-nearest-even bf16 casts (interpreter only)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,  # chunk of FLAGS scanned for rows with duplicates
):
    """``grad[b, r] = sum of grad_out[b, k] over ids[b, k] == r``, walking the links (an inverse-
    permutation gather when the ids are distinct); no sort, no atomics, no zero-fill."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    g = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) int32: R < 2**31
    rmask = rows < R
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    dmask = cols < D
    m = rmask[:, None] & dmask[None, :]
    acc_dtype: tl.constexpr = tl.float64 if FP64 else tl.float32
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_dtype)
    b0 = g.to(tl.int64) * b_per_group  # int64 loop index: b * stride cannot overflow
    b1 = tl.minimum(b0 + b_per_group, B)
    # software pipeline: the next batch row's loads are in flight while this one is stored/summed
    k_n = tl.load(FIRST + b0 * R + rows, mask=rmask, other=-1)
    v_n = tl.load(
        GO + b0 * stride_gb + tl.where(k_n >= 0, k_n, 0).to(tl.int64)[:, None] * stride_gk + cols[None, :] * stride_gd,
        mask=(k_n >= 0)[:, None] & dmask[None, :],
        other=0.0,
    )
    for bb in range(b0, b1):
        k, v = k_n, v_n.to(acc_dtype)
        more = bb + 1 < b1
        k_n = tl.load(FIRST + (bb + 1) * R + rows, mask=rmask & more, other=-1)
        v_n = tl.load(
            GO
            + (bb + 1) * stride_gb
            + tl.where(k_n >= 0, k_n, 0).to(tl.int64)[:, None] * stride_gk
            + cols[None, :] * stride_gd,
            mask=(k_n >= 0)[:, None] & dmask[None, :],
            other=0.0,
        )
        if PER_BATCH:
            tl.store(
                DST + (bb * R + rows)[:, None] * D + cols[None, :], _cast(v, DST.dtype.element_ty, RTNE_BF16), mask=m
            )
        if SUM_BATCH:
            acc += v
    # batch rows with duplicated ids (none for distinct ids): add the later sources along the chains
    # (the main loop took only the first); the walk iterates once per such row
    bb = _next_flagged(FLAGS, b0, b1, b0 - 1, 1, BLOCK_B)
    while bb < b1:
        k = tl.load(FIRST + bb * R + rows, mask=rmask, other=-1)
        live = k >= 0
        ks = tl.where(live, k, 0).to(tl.int64)
        nk = tl.load(NEXT + bb * K + ks, mask=live, other=-1)
        extra = _walk_chains(
            tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_dtype),
            GO + bb * stride_gb,
            nk,
            NEXT + bb * K,
            cols,
            dmask,
            stride_gk,
            stride_gd,
        )
        if PER_BATCH:
            v = tl.load(
                GO + bb * stride_gb + ks[:, None] * stride_gk + cols[None, :] * stride_gd,
                mask=live[:, None] & dmask[None, :],
                other=0.0,
            ).to(acc_dtype)
            tl.store(
                DST + (bb * R + rows)[:, None] * D + cols[None, :],
                _cast(v + extra, DST.dtype.element_ty, RTNE_BF16),
                mask=m,
            )
        if SUM_BATCH:
            acc += extra
        bb = _next_flagged(FLAGS, b0, b1, bb, 1, BLOCK_B)
    if SUM_BATCH:
        tl.store(PART + (g.to(tl.int64) * R + rows)[:, None] * D + cols[None, :], acc, mask=m)


# ----------------------------------------------------------------------------- restore


@triton.jit(do_not_specialize=["K"])
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


@triton.jit(do_not_specialize=["K"])
def restore_tokens_bwd_kernel(
    GO,  # grad_out: (B, N, D), strides (stride_gb, stride_gn, stride_gd)
    IDS,  # ids_restore: (B, N) int32/int64, strides (stride_ib, stride_in)
    FIRST,  # (B, K) int32: first position i with ids_restore[b, i] == j, -1 if none (token_links_kernel)
    NEXT,  # (B, N) int32: next position with the same id, -1 at the end of a chain
    FLAGS,  # (B,) int32: 0 if row b maps positions onto 0..K-1 one-to-one (token_links_kernel)
    GVIS,  # grad_visible: (B, K, D) contiguous, written entirely (no zero-fill); unused unless WRITE_VIS
    PART_MT,  # (G, n_nblocks, D) fp32/fp64 contiguous: masked-row sums of each (group, N tile)
    PART_POS,  # (G, N, D) fp32/fp64 contiguous: batch sums of each group; unused unless HAS_POS
    B,
    K,
    N,
    D,
    b_per_group,  # batch rows per program along axis 2 (G = cdiv(B, b_per_group))
    stride_gb,
    stride_gn,
    stride_gd,
    stride_ib,
    stride_in,
    WRITE_VIS: tl.constexpr,
    HAS_POS: tl.constexpr,
    FP64: tl.constexpr,
    RTNE_BF16: tl.constexpr,  # emulate round-to-nearest-even bf16 casts (interpreter only)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,  # chunk of FLAGS scanned for rows that are no permutation
):
    """One pass over ``grad_out``: program (N tile, D tile, group of batch rows) reads each row once,
    writes ``grad_visible[b, j]`` from the first position i of id j (plus its duplicates' rows, which
    only a non-permutation has), zeros the rows of ``grad_visible`` no position refers to (none for a
    permutation), and accumulates the mask-token and position sums in registers (one cross-row
    reduction per program, at the end).  Deterministic: fixed loop orders, fp32 partials."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    g = tl.program_id(2)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) int32: N < 2**31
    nmask = ns < N
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    dmask = cols < D
    m = nmask[:, None] & dmask[None, :]
    acc_dtype: tl.constexpr = tl.float64 if FP64 else tl.float32
    acc_mt = tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_dtype)
    acc_pos = tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_dtype)
    jmask = ns < K  # this tile's rows of grad_visible (j = ns): zeroed if nothing refers to them
    b0 = g.to(tl.int64) * b_per_group  # int64 loop index: b * stride cannot overflow
    b1 = tl.minimum(b0 + b_per_group, B)
    # software pipeline: the next batch row's loads are in flight while this one is processed
    j_n = tl.load(IDS + b0 * stride_ib + ns * stride_in, mask=nmask, other=-1).to(tl.int32)
    gr_n = tl.load(GO + b0 * stride_gb + ns[:, None] * stride_gn + cols[None, :] * stride_gd, mask=m, other=0.0)
    for bb in range(b0, b1):
        j, gr = j_n, gr_n.to(acc_dtype)
        more = bb + 1 < b1
        j_n = tl.load(IDS + (bb + 1) * stride_ib + ns * stride_in, mask=nmask & more, other=-1).to(tl.int32)
        gr_n = tl.load(
            GO + (bb + 1) * stride_gb + ns[:, None] * stride_gn + cols[None, :] * stride_gd, mask=m & more, other=0.0
        )
        vis = (j >= 0) & (j < K)  # as in the forward: other ids took the mask token
        acc_mt += tl.where(vis[:, None], 0.0, gr)
        if HAS_POS:
            acc_pos += gr
        if WRITE_VIS:  # rows of a permutation (FLAGS 0): every visible position is its id's only one
            regular = tl.load(FLAGS + bb) == 0
            tl.store(
                GVIS + bb * K * D + tl.where(vis, j, 0).to(tl.int64)[:, None] * D + cols[None, :],
                _cast(gr, GVIS.dtype.element_ty, RTNE_BF16),
                mask=(vis & regular)[:, None] & dmask[None, :],
            )
    if WRITE_VIS:
        # rows that are no permutation of 0..K-1 (none in MAE use): the first position of each id
        # writes its row plus its duplicates' rows, rows no position takes get zeros
        bb = _next_flagged(FLAGS, b0, b1, b0 - 1, 3, BLOCK_B)
        while bb < b1:
            j = tl.load(IDS + bb * stride_ib + ns * stride_in, mask=nmask, other=-1).to(tl.int32)
            vis = (j >= 0) & (j < K)
            js = tl.where(vis, j, 0)
            gv_b = GVIS + bb * K * D
            first = vis & (tl.load(FIRST + bb * K + js, mask=vis, other=-1) == ns)
            v = tl.load(GO + bb * stride_gb + ns[:, None] * stride_gn + cols[None, :] * stride_gd, mask=m, other=0.0)
            nk = tl.load(NEXT + bb * N + ns, mask=first, other=-1)
            v = _walk_chains(v.to(acc_dtype), GO + bb * stride_gb, nk, NEXT + bb * N, cols, dmask, stride_gn, stride_gd)
            tl.store(
                gv_b + js.to(tl.int64)[:, None] * D + cols[None, :],
                _cast(v, GVIS.dtype.element_ty, RTNE_BF16),
                mask=first[:, None] & dmask[None, :],
            )
            unused = jmask & (tl.load(FIRST + bb * K + ns, mask=jmask, other=0) < 0)
            tl.store(
                gv_b + ns.to(tl.int64)[:, None] * D + cols[None, :],
                tl.zeros((BLOCK_N, BLOCK_D), dtype=GVIS.dtype.element_ty),
                mask=unused[:, None] & dmask[None, :],
            )
            bb = _next_flagged(FLAGS, b0, b1, bb, 3, BLOCK_B)
    gi = g.to(tl.int64)
    tl.store(PART_MT + (gi * tl.num_programs(0) + pid_n) * D + cols, tl.sum(acc_mt, axis=0), mask=dmask)
    if HAS_POS:
        tl.store(PART_POS + (gi * N + ns)[:, None] * D + cols[None, :], acc_pos, mask=m)


# ----------------------------------------------------------------------------- partial sums


@triton.jit
def _sum_rows(
    PART,
    OUT,
    OUT2,
    G,
    M,
    blk,
    HAS_OUT2: tl.constexpr,
    RTNE_BF16: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """OUT[cols] (and OUT2) = sum over the G rows of PART (G, M) at column block ``blk``, BLOCK_G
    rows per step summed in registers, the steps in order (deterministic)."""
    cols = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = cols < M
    acc = tl.zeros((BLOCK_G, BLOCK), dtype=PART.dtype.element_ty)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        acc += tl.load(
            PART + gs.to(tl.int64)[:, None] * M + cols[None, :], mask=(gs < G)[:, None] & msk[None, :], other=0.0
        )
    tot = tl.sum(acc, axis=0)
    tl.store(OUT + cols, _cast(tot, OUT.dtype.element_ty, RTNE_BF16), mask=msk)
    if HAS_OUT2:
        tl.store(OUT2 + cols, _cast(tot, OUT2.dtype.element_ty, RTNE_BF16), mask=msk)


@triton.jit
def sum_partials_kernel(
    PART,  # (G, M) fp32/fp64 contiguous: per-group partial sums
    OUT,  # (M,) contiguous: sum over the G rows, cast to OUT's dtype
    OUT2,  # (M,) contiguous: the same sum in OUT2's dtype; unused unless HAS_OUT2
    PART_B,  # (G_B, M_B) fp32/fp64 contiguous: a second, independent reduction; unused unless HAS_B
    OUT_B,  # (M_B,) contiguous; unused unless HAS_B
    G,
    M,
    G_B,
    M_B,
    n_blocks,  # programs of the first reduction (cdiv(M, BLOCK)); the rest do the second
    HAS_OUT2: tl.constexpr,
    HAS_B: tl.constexpr,
    RTNE_BF16: tl.constexpr,  # emulate round-to-nearest-even bf16 casts (interpreter only)
    BLOCK_G: tl.constexpr,  # partial rows loaded per step (all of them in flight at once)
    BLOCK: tl.constexpr,
    BLOCK_G_B: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Fixed-order reductions of the backwards' batch-group partials and the casts, one launch for
    one or two reductions (restore: the position and the mask-token gradients)."""
    pid = tl.program_id(0)
    if pid < n_blocks:
        _sum_rows(PART, OUT, OUT2, G, M, pid, HAS_OUT2, RTNE_BF16, BLOCK_G, BLOCK)
    elif HAS_B:
        _sum_rows(PART_B, OUT_B, OUT_B, G_B, M_B, pid - n_blocks, False, RTNE_BF16, BLOCK_G_B, BLOCK_B)
