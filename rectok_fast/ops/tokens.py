"""Token selection for MAE-style masking: ``gather_tokens`` (keep the visible tokens / RoPE rows)
and ``restore_tokens`` (insert mask tokens and un-shuffle).

Chain: launchers (validate, allocate, launch :mod:`rectok_fast.kernels.tokens`) ->
``torch.library.custom_op`` ops ``rectok_fast::gather_tokens_fwd/_bwd`` and
``rectok_fast::restore_tokens_fwd/_bwd`` with fake implementations -> ``register_autograd`` ->
the functionals :func:`gather_tokens` and :func:`restore_tokens`.

Both backwards are deterministic (no atomics, no sort): a small kernel links, per batch row, the
sources of every destination row in increasing order (for a permutation: the inverse permutation,
chains of length one); ``gather_tokens`` then gathers through it (an inverse-permutation gather,
summing duplicated ids along their chain), ``restore_tokens`` reads ``grad_out`` once and writes
``grad_visible`` from each id's first position.  Batch sums (shared tables, ``pos``, the mask
token) are fp32 (fp64 for fp64 inputs) partials per group of batch rows, summed in a fixed order.
"""

from __future__ import annotations

import torch

from .._backend import kernels, resolve_backend, triton_interpret
from .._constants import FLOAT_DTYPES, INDEX_DTYPES
from .._validate import check_index_range, check_same_device, check_shape, check_tensor, data_checks_active
from ..reference import tokens as _ref
from ._launch import cdiv, next_power_of_2

__all__ = ["gather_tokens", "restore_tokens"]

# The Triton interpreter truncates float -> bf16 casts; the kernels then round with integer ops so that
# CPU runs are bitwise equal to compiled ones (decided when this module is imported, like @triton.jit).
_RTNE_BF16 = triton_interpret()
_BLOCK_TOKENS = 16  # tokens (rows) per program
_MAX_BLOCK_D = 256  # feature chunk streamed per loop iteration / per program
_BLOCK_D_BWD = 128  # the backwards loop over the batch: tile D finer for more programs
_BWD_WARPS = 4  # 16 x 128 tile: 16 elements per thread (8 for fp64, whose tile is 16 x 64)
_MAX_SORT_L = 4096  # token_links_kernel sorts a row of up to this many ids in one program
_TARGET_PROGRAMS = 1024  # ~8 resident programs per SM on a 132-SM GPU for the batch-looping backwards
_MAX_GRID_Z = 65535  # CUDA's limit on the grid's third axis
_MIN_ROWS_PER_GROUP = 32  # a group's fp32 partial costs 8 bytes/element: amortise it over >= 32 batch rows


def _block_d(D: int, cap: int = _MAX_BLOCK_D) -> int:
    return min(next_power_of_2(max(D, 1)), cap)


def _num_warps(block_rows: int, block_d: int) -> int:
    return 4 if block_rows * block_d >= 2048 else 2


# ----------------------------------------------------------------------------- validation


def _check_pos(op: str, pos: torch.Tensor, N: int, D: int) -> torch.Tensor:
    """pos (N, D) or (1, N, D) -> the (N, D) view."""
    check_tensor(op, "pos", pos, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    if pos.dim() == 3:
        check_shape(op, "pos", pos, (1, N, D))
    else:
        check_shape(op, "pos", pos, (N, D))
    return pos.reshape(N, D)


def _check_gather(
    x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None, *, check_range: bool
) -> tuple[int, int, int, int, bool]:
    """Validate ``gather_tokens`` arguments; return (B, K, N, D, shared)."""
    op = "gather_tokens"
    check_tensor(op, "x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_tensor(op, "ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES)
    check_same_device(op, x=x, ids_keep=ids_keep, pos=pos)
    B, K = ids_keep.shape
    N, D = x.shape[-2], x.shape[-1]
    if x.dim() == 3 and x.shape[0] not in (1, B):
        raise ValueError(
            f"{op}: `x` must have batch {B} (that of `ids_keep`) or 1 (a shared table), got shape {tuple(x.shape)}"
        )
    shared = x.dim() == 2 or x.shape[0] == 1
    if pos is not None:
        _check_pos(op, pos, N, D)
    if check_range:
        check_index_range(op, "ids_keep", ids_keep, N)
    return B, K, N, D, shared


def _check_restore(
    visible: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos: torch.Tensor | None,
    *,
    check_range: bool,
) -> tuple[int, int, int, int]:
    """Validate ``restore_tokens`` arguments; return (B, K, N, D)."""
    op = "restore_tokens"
    check_tensor(op, "visible", visible, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(op, "ids_restore", ids_restore, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor(op, "mask_token", mask_token, ndim=(1, 2, 3), dtypes=FLOAT_DTYPES)
    check_same_device(op, visible=visible, ids_restore=ids_restore, mask_token=mask_token, pos=pos)
    B, K, D = visible.shape
    if ids_restore.shape[0] != B:
        raise ValueError(
            f"{op}: `ids_restore` must have batch {B} (that of `visible`), got shape {tuple(ids_restore.shape)}"
        )
    N = ids_restore.shape[1]
    if N < K:
        raise ValueError(f"{op}: `ids_restore` has length {N} < the number of visible tokens K = {K}")
    if mask_token.shape[-1] != D or mask_token.numel() != D:
        raise ValueError(
            f"{op}: `mask_token` must hold D = {D} elements ((D,) or (1, 1, D)), got {tuple(mask_token.shape)}"
        )
    if pos is not None:
        _check_pos(op, pos, N, D)
    if check_range:
        _check_permutation(op, "ids_restore", ids_restore)
    return B, K, N, D


def _check_permutation(op: str, name: str, idx: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every row of ``idx`` (B, N) is a permutation of 0..N-1.

    A host sync (one value read back), so it runs only where the eager index checks run
    (:func:`rectok_fast._validate.data_checks_active`); the error path reads the first bad row.
    """
    if not data_checks_active(idx):
        return
    N = idx.shape[1]
    bad = (torch.sort(idx, dim=1).values != torch.arange(N, device=idx.device, dtype=idx.dtype)).any(dim=1)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        row = idx[b]
        lo, hi = int(row.min()), int(row.max())
        dup = int(N - torch.unique(row).numel())
        raise ValueError(
            f"{op}: `{name}` must hold a permutation of 0..{N - 1} in every row; row {b} is not one "
            f"(entries in [{lo}, {hi}], {dup} repeated)"
        )


# ----------------------------------------------------------------------------- launchers


def _gather_fwd(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    # no index-range check here: this runs inside compiled graphs and must not sync with the host;
    # the kernel reads out-of-range ids as zero rows instead
    B, K, N, D, shared = _check_gather(x, ids_keep, pos, check_range=False)
    out_dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    out = torch.empty((B, K, D), device=x.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    x3 = x.reshape(N, D).unsqueeze(0) if x.dim() == 2 else x
    sxb = 0 if (shared and B != 1) else x3.stride(0)
    p = pos.reshape(N, D) if pos is not None else x3[0]  # dummy pointer when HAS_POS=False
    bk, bd = _BLOCK_TOKENS, _block_d(D)
    n_kblocks = cdiv(K, bk)
    kernels("tokens").gather_tokens_fwd_kernel[(B * n_kblocks,)](
        x3,
        ids_keep,
        p,
        out,
        K,
        N,
        D,
        n_kblocks,
        sxb,
        x3.stride(1),
        x3.stride(2),
        ids_keep.stride(0),
        ids_keep.stride(1),
        p.stride(0),
        p.stride(1),
        HAS_POS=pos is not None,
        FP64=out_dtype == torch.float64,
        RTNE_BF16=_RTNE_BF16,
        BLOCK_K=bk,
        BLOCK_D=bd,
        num_warps=_num_warps(bk, bd),
    )
    return out


def _links(ids: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FIRST (B, num_rows), NEXT (B, L), FLAGS (B,)) int32 source chains of ``ids`` (B, L); see
    token_links_kernel.

    Rows longer than ``_MAX_SORT_L`` (one program sorts a whole row in registers) use the same
    construction with ``torch.sort`` instead (more launches, same result)."""
    B, L = ids.shape
    dev = ids.device
    if B * L == 0:
        return (
            torch.full((B, num_rows), -1, device=dev, dtype=torch.int32),
            torch.empty((B, L), device=dev, dtype=torch.int32),
            torch.full((B,), 0 if num_rows == 0 else 2, device=dev, dtype=torch.int32),
        )
    if L > _MAX_SORT_L:
        return _links_torch(ids, num_rows)
    first = torch.empty((B, num_rows), device=dev, dtype=torch.int32)
    nxt = torch.empty((B, L), device=dev, dtype=torch.int32)
    flags = torch.empty((B,), device=dev, dtype=torch.int32)
    bl = next_power_of_2(L)
    shift = bl.bit_length() - 1
    kernels("tokens").token_links_kernel[(B,)](
        ids,
        first,
        nxt,
        flags,
        L,
        num_rows,
        ids.stride(0),
        ids.stride(1),
        SHIFT=shift,
        KEY64=((num_rows + 1) << shift) >= 2**31,
        BLOCK_L=bl,
        BLOCK_R=min(next_power_of_2(max(num_rows, 1)), 1024),
        num_warps=4 if bl <= 1024 else 8,
    )
    return first, nxt, flags


def _links_torch(ids: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token_links_kernel`` in PyTorch ops (stable sort by destination, compare neighbours)."""
    B, L = ids.shape
    idx = ids.to(torch.int64)
    dst = torch.where((idx >= 0) & (idx < num_rows), idx, num_rows)
    sd, src = torch.sort(dst, dim=1, stable=True)
    real = sd < num_rows
    same_next = torch.zeros_like(real)
    same_next[:, :-1] = (sd[:, 1:] == sd[:, :-1]) & real[:, :-1]
    first = real.clone()
    first[:, 1:] &= sd[:, 1:] != sd[:, :-1]
    nxt_sorted = torch.full_like(src, -1)
    nxt_sorted[:, :-1] = torch.where(same_next[:, :-1], src[:, 1:], -1)
    nxt = torch.empty_like(src).scatter_(1, src, nxt_sorted)
    first_tab = torch.full((B, num_rows + 1), -1, device=ids.device, dtype=torch.int64)
    first_tab.scatter_(1, torch.where(first, sd, num_rows), torch.where(first, src, -1))
    flags = same_next.any(dim=1).to(torch.int32) | torch.where(first.sum(dim=1) < num_rows, 2, 0).to(torch.int32)
    return first_tab[:, :num_rows].to(torch.int32).contiguous(), nxt.to(torch.int32), flags


def _sum_blocks(G: int, M: int) -> tuple[int, int]:
    """(BLOCK_G, BLOCK) of one reduction: every partial row of a column block in flight at once."""
    block_g = min(next_power_of_2(max(G, 1)), 128)
    return block_g, max(32, min(4096 // block_g, next_power_of_2(max(M, 1))))


def _sum_partials(
    part: torch.Tensor,
    out: torch.Tensor,
    out2: torch.Tensor | None = None,
    second: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """``out = part.reshape(-1, out.numel()).sum(0)`` (and ``out2``; and ``second = (part_b, out_b)``
    the same way), summed in a fixed order and cast, in one launch; the partials contiguous."""
    M = out.numel()
    G = part.numel() // M
    bg, bm = _sum_blocks(G, M)
    n_blocks = cdiv(M, bm)
    if second is not None:
        part_b, out_b = second
        M_B = out_b.numel()
        G_B = part_b.numel() // M_B
    else:
        part_b, out_b, M_B, G_B = part, out, 1, 1
    bg_b, bm_b = _sum_blocks(G_B, M_B)
    kernels("tokens").sum_partials_kernel[(n_blocks + (cdiv(M_B, bm_b) if second is not None else 0),)](
        part,
        out,
        out if out2 is None else out2,
        part_b,
        out_b,
        G,
        M,
        G_B,
        M_B,
        n_blocks,
        HAS_OUT2=out2 is not None,
        HAS_B=second is not None,
        RTNE_BF16=_RTNE_BF16,
        BLOCK_G=bg,
        BLOCK=bm,
        BLOCK_G_B=bg_b,
        BLOCK_B=bm_b,
        num_warps=4,
    )


def _batch_groups(B: int, tiles: int) -> int:
    """Batch rows per program for a batch-summing backward over ``tiles`` (row, feature) tiles: enough
    programs to keep the memory system busy (``_TARGET_PROGRAMS``) while the fp32 partials (one
    (rows, D) slab per group) stay a small fraction of the bytes read."""
    groups = max(1, min(cdiv(_TARGET_PROGRAMS, tiles), B // _MIN_ROWS_PER_GROUP, B))
    return cdiv(B, groups)


def _flag_block(rows_per_group: int) -> int:
    """FLAGS entries a backward program scans per step for its irregular batch rows."""
    return min(next_power_of_2(max(rows_per_group, 1)), 256)


def _per_batch_rows(B: int) -> int:
    """Batch rows per program when nothing is summed over the batch: one, unless B exceeds the grid's
    third axis (65535 programs)."""
    return cdiv(B, min(B, _MAX_GRID_Z))


def _gather_bwd(
    grad_out: torch.Tensor,
    ids_keep: torch.Tensor,
    num_rows: int,
    shared: bool,
    need_x: bool,
    x_dtype: torch.dtype,
    need_pos: bool,
    pos_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``gather_tokens``: ``x``'s ((num_rows, D) if ``shared`` else (B, num_rows, D)) and
    ``pos``'s ((num_rows, D), the batch sum), each (0,) when not requested."""
    B, K, D = grad_out.shape
    dev = grad_out.device
    x_shape = (num_rows, D) if shared else (B, num_rows, D)
    per_batch = need_x and not shared
    sum_batch = need_pos or (need_x and shared)
    gx = torch.empty(x_shape if need_x else (0,), device=dev, dtype=x_dtype)
    gpos = torch.empty((num_rows, D) if need_pos else (0,), device=dev, dtype=pos_dtype)
    if not (need_x or need_pos):
        return gx, gpos
    if B * K == 0 or num_rows * D == 0:
        return gx.zero_(), gpos.zero_()
    fp64 = torch.float64 in (grad_out.dtype, x_dtype if need_x else None, pos_dtype if need_pos else None)
    acc_dtype = torch.float64 if fp64 else torch.float32
    first, nxt, flags = _links(ids_keep, num_rows)
    bn, bd = _BLOCK_TOKENS, _block_d(D, _BLOCK_D_BWD // 2 if fp64 else _BLOCK_D_BWD)  # fp64: half the tile (registers)
    tiles = cdiv(num_rows, bn) * cdiv(D, bd)
    bpg = _batch_groups(B, tiles) if sum_batch else _per_batch_rows(B)
    groups = cdiv(B, bpg)
    part = torch.empty((groups, num_rows, D) if sum_batch else (1,), device=dev, dtype=acc_dtype)
    dst = gx if per_batch else part  # any valid pointer when PER_BATCH=False
    kernels("tokens").gather_tokens_bwd_kernel[(cdiv(num_rows, bn), cdiv(D, bd), groups)](
        grad_out,
        first,
        nxt,
        flags,
        dst,
        part,
        B,
        K,
        num_rows,
        D,
        bpg,
        grad_out.stride(0),
        grad_out.stride(1),
        grad_out.stride(2),
        PER_BATCH=per_batch,
        SUM_BATCH=sum_batch,
        FP64=fp64,
        RTNE_BF16=_RTNE_BF16,
        BLOCK_N=bn,
        BLOCK_D=bd,
        BLOCK_B=_flag_block(bpg),
        num_warps=_BWD_WARPS,
    )
    if sum_batch:
        outs = ([gx] if need_x and shared else []) + ([gpos] if need_pos else [])
        _sum_partials(part, *outs)
    return gx, gpos


def _restore_fwd(
    visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor | None
) -> torch.Tensor:
    # no index-range check (no host sync inside compiled graphs): ids outside [0, K) read the mask token
    B, K, N, D = _check_restore(visible, ids_restore, mask_token, pos, check_range=False)
    out_dtype = visible.dtype if pos is None else torch.promote_types(visible.dtype, pos.dtype)
    out = torch.empty((B, N, D), device=visible.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    mt = mask_token.reshape(D)
    p = pos.reshape(N, D) if pos is not None else mt.unsqueeze(0)  # dummy pointer when HAS_POS=False
    # K = 0: no visible row is ever read; pass the mask token as a harmless non-empty base pointer
    vis = visible if K > 0 else mt.to(visible.dtype).reshape(1, 1, D)
    bn, bd = _BLOCK_TOKENS, _block_d(D)
    n_nblocks = cdiv(N, bn)
    kernels("tokens").restore_tokens_fwd_kernel[(B * n_nblocks,)](
        vis,
        ids_restore,
        mt,
        p,
        out,
        K,
        N,
        D,
        n_nblocks,
        vis.stride(0),
        vis.stride(1),
        vis.stride(2),
        ids_restore.stride(0),
        ids_restore.stride(1),
        mt.stride(0),
        p.stride(0),
        p.stride(1),
        HAS_POS=pos is not None,
        FP64=out_dtype == torch.float64,
        RTNE_BF16=_RTNE_BF16,
        BLOCK_N=bn,
        BLOCK_D=bd,
        num_warps=_num_warps(bn, bd),
    )
    return out


def _restore_bwd(
    grad_out: torch.Tensor,
    ids_restore: torch.Tensor,
    num_visible: int,
    visible_dtype: torch.dtype,
    mask_dtype: torch.dtype,
    has_pos: bool,
    pos_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N, D = grad_out.shape
    K = num_visible
    dev = grad_out.device
    g_vis = torch.empty((B, K, D), device=dev, dtype=visible_dtype)  # written entirely by the kernel
    g_pos = torch.empty((N, D) if has_pos else (0,), device=dev, dtype=pos_dtype)
    fp64 = torch.float64 in (grad_out.dtype, visible_dtype, mask_dtype) or (has_pos and pos_dtype == torch.float64)
    acc_dtype = torch.float64 if fp64 else torch.float32
    if B * N * D == 0:
        if has_pos:
            g_pos.zero_()
        return g_vis.zero_(), torch.zeros((D,), device=dev, dtype=mask_dtype), g_pos
    first, nxt, flags = _links(ids_restore, K)
    bn, bd = _BLOCK_TOKENS, _block_d(D, _BLOCK_D_BWD // 2 if fp64 else _BLOCK_D_BWD)  # fp64: half the tile (registers)
    n_nblocks, n_dblocks = cdiv(N, bn), cdiv(D, bd)
    bpg = _batch_groups(B, n_nblocks * n_dblocks)
    groups = cdiv(B, bpg)
    part_mt = torch.empty((groups, n_nblocks, D), device=dev, dtype=acc_dtype)
    part_pos = torch.empty((groups, N, D) if has_pos else (1,), device=dev, dtype=acc_dtype)
    gv = g_vis if K > 0 else part_mt  # K = 0: every store is masked off; any valid pointer will do
    kernels("tokens").restore_tokens_bwd_kernel[(n_nblocks, n_dblocks, groups)](
        grad_out,
        ids_restore,
        first,
        nxt,
        flags,
        gv,
        part_mt,
        part_pos,
        B,
        K,
        N,
        D,
        bpg,
        grad_out.stride(0),
        grad_out.stride(1),
        grad_out.stride(2),
        ids_restore.stride(0),
        ids_restore.stride(1),
        WRITE_VIS=K > 0,
        HAS_POS=has_pos,
        FP64=fp64,
        RTNE_BF16=_RTNE_BF16,
        BLOCK_N=bn,
        BLOCK_D=bd,
        BLOCK_B=_flag_block(bpg),
        num_warps=_BWD_WARPS,
    )
    g_mt = torch.empty((D,), device=dev, dtype=mask_dtype)
    if has_pos:
        _sum_partials(part_pos, g_pos, second=(part_mt, g_mt))
    else:
        _sum_partials(part_mt, g_mt)
    return g_vis, g_mt, g_pos


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("rectok_fast::gather_tokens_fwd", mutates_args=())
def gather_tokens_fwd(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return _gather_fwd(x, ids_keep, pos)


@gather_tokens_fwd.register_fake
def _(x, ids_keep, pos):
    dtype = x.dtype if pos is None else torch.promote_types(x.dtype, pos.dtype)
    return x.new_empty((ids_keep.shape[0], ids_keep.shape[1], x.shape[-1]), dtype=dtype)


@torch.library.custom_op("rectok_fast::gather_tokens_bwd", mutates_args=())
def gather_tokens_bwd(
    grad_out: torch.Tensor,
    ids_keep: torch.Tensor,
    num_rows: int,
    shared: bool,
    need_x: bool,
    x_dtype: torch.dtype,
    need_pos: bool,
    pos_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _gather_bwd(grad_out, ids_keep, num_rows, shared, need_x, x_dtype, need_pos, pos_dtype)


@gather_tokens_bwd.register_fake
def _(grad_out, ids_keep, num_rows, shared, need_x, x_dtype, need_pos, pos_dtype):
    B, _, D = grad_out.shape
    x_shape = ((num_rows, D) if shared else (B, num_rows, D)) if need_x else (0,)
    return (
        grad_out.new_empty(x_shape, dtype=x_dtype),
        grad_out.new_empty((num_rows, D) if need_pos else (0,), dtype=pos_dtype),
    )


def _gather_setup_context(ctx, inputs, output):
    x, ids_keep, pos = inputs
    ctx.save_for_backward(ids_keep)
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.shared = x.dim() == 2 or x.shape[0] == 1
    ctx.pos_shape = None if pos is None else pos.shape
    ctx.pos_dtype = x.dtype if pos is None else pos.dtype


def _gather_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_pos = ctx.pos_shape is not None and ctx.needs_input_grad[2]
    if not (need_x or need_pos):
        return None, None, None
    gx, gpos = gather_tokens_bwd(
        grad, ids_keep, ctx.x_shape[-2], ctx.shared, need_x, ctx.x_dtype, need_pos, ctx.pos_dtype
    )
    return (
        gx.reshape(ctx.x_shape) if need_x else None,
        None,
        gpos.reshape(ctx.pos_shape) if need_pos else None,
    )


gather_tokens_fwd.register_autograd(_gather_backward, setup_context=_gather_setup_context)


@torch.library.custom_op("rectok_fast::restore_tokens_fwd", mutates_args=())
def restore_tokens_fwd(
    visible: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor | None
) -> torch.Tensor:
    return _restore_fwd(visible, ids_restore, mask_token, pos)


@restore_tokens_fwd.register_fake
def _(visible, ids_restore, mask_token, pos):
    dtype = visible.dtype if pos is None else torch.promote_types(visible.dtype, pos.dtype)
    return visible.new_empty((visible.shape[0], ids_restore.shape[1], visible.shape[2]), dtype=dtype)


@torch.library.custom_op("rectok_fast::restore_tokens_bwd", mutates_args=())
def restore_tokens_bwd(
    grad_out: torch.Tensor,
    ids_restore: torch.Tensor,
    num_visible: int,
    visible_dtype: torch.dtype,
    mask_dtype: torch.dtype,
    has_pos: bool,
    pos_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _restore_bwd(grad_out, ids_restore, num_visible, visible_dtype, mask_dtype, has_pos, pos_dtype)


@restore_tokens_bwd.register_fake
def _(grad_out, ids_restore, num_visible, visible_dtype, mask_dtype, has_pos, pos_dtype):
    B, N, D = grad_out.shape
    return (
        grad_out.new_empty((B, num_visible, D), dtype=visible_dtype),
        grad_out.new_empty((D,), dtype=mask_dtype),
        grad_out.new_empty((N, D) if has_pos else (0,), dtype=pos_dtype),
    )


def _restore_setup_context(ctx, inputs, output):
    visible, ids_restore, mask_token, pos = inputs
    ctx.save_for_backward(ids_restore)
    ctx.K, ctx.visible_dtype = visible.shape[1], visible.dtype
    ctx.mask_shape, ctx.mask_dtype = mask_token.shape, mask_token.dtype
    ctx.pos_shape = None if pos is None else pos.shape
    ctx.pos_dtype = visible.dtype if pos is None else pos.dtype


def _restore_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    need_vis, _, need_mt, need_pos = ctx.needs_input_grad
    if not (need_vis or need_mt or need_pos):
        return None, None, None, None
    has_pos = ctx.pos_shape is not None
    g_vis, g_mt, g_pos = restore_tokens_bwd(
        grad, ids_restore, ctx.K, ctx.visible_dtype, ctx.mask_dtype, has_pos, ctx.pos_dtype
    )
    return (
        g_vis if need_vis else None,
        None,
        g_mt.reshape(ctx.mask_shape) if need_mt else None,
        g_pos.reshape(ctx.pos_shape) if (has_pos and need_pos) else None,
    )


restore_tokens_fwd.register_autograd(_restore_backward, setup_context=_restore_setup_context)


# ----------------------------------------------------------------------------- functionals


def gather_tokens(
    x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Keep the tokens ``ids_keep``: ``out[b, k] = x[b, ids_keep[b, k]] (+ pos[ids_keep[b, k]])``.

    Args:
        x: (B, N, D) tokens, or a table shared by the batch, (N, D) or (1, N, D) (e.g. RoPE rows).
        ids_keep: (B, K) int32/int64 indices in [0, N) (duplicates allowed; their gradients add up).
        pos: optional (N, D) or (1, N, D) position table, added to the gathered rows.
        backend: ``"auto"`` (Triton on CUDA, the reference otherwise), ``"triton"`` or ``"reference"``.

    Raises:
        ValueError: naming ``ids_keep`` when an entry is outside [0, N).  This eager check reads the
            ids back to the host (a device sync); it is skipped under ``torch.compile`` and when the
            environment variable ``RECTOK_FAST_CHECK_INDICES=0``.  Without it the Triton path reads an
            out-of-range id as a zero row (no memory error, no gradient); the reference path's
            ``torch.gather`` may raise a device-side error.

    Returns:
        (B, K, D), dtype of ``x`` (promoted with ``pos``'s).  Gradients reach ``x`` and ``pos``
        (summed over the batch for shared tables), accumulated in fp32 in a fixed order.
    """
    check_tensor("gather_tokens", "x", x)
    check_tensor("gather_tokens", "ids_keep", ids_keep)
    chosen = resolve_backend("gather_tokens", backend, x, ids_keep, pos)
    # shapes are checked for both paths (also while tracing under torch.compile); the index range (a
    # host sync) only here, in eager mode, unless RECTOK_FAST_CHECK_INDICES=0: the registered op never syncs
    _check_gather(x, ids_keep, pos, check_range=True)
    if chosen == "reference":
        return _ref.gather_tokens(x, ids_keep, pos)
    return gather_tokens_fwd(x, ids_keep, pos)


def restore_tokens(
    visible: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Insert ``N - K`` mask tokens after the visible ones and un-shuffle (the MAE decoder input).

    ``out[b, i] = (visible[b, j] if j < K else mask_token) (+ pos[i])`` with ``j = ids_restore[b, i]``.

    Args:
        visible: (B, K, D) visible tokens.
        ids_restore: (B, N) int32/int64, each row a permutation of 0..N-1 (N >= K): position i
            takes visible token ``ids_restore[b, i]`` if it is < K, else the mask token.
        mask_token: (D,) or (1, 1, D) learned mask token (cast to ``visible``'s dtype).
        pos: optional (N, D) or (1, N, D) position embedding.
        backend: ``"auto"`` (Triton on CUDA, the reference otherwise), ``"triton"`` or ``"reference"``.

    Raises:
        ValueError: naming ``ids_restore`` when a row is not a permutation of 0..N-1.  This eager
            check reads the ids back to the host (a device sync); it is skipped under
            ``torch.compile`` and when the environment variable ``RECTOK_FAST_CHECK_INDICES=0``.
            Without it, any ids give the result of the formula above on the Triton path, forward
            and backward alike: an id outside [0, K) (negative ones included) takes the mask token,
            and a visible token that several positions take receives the sum of their gradients
            (one that none takes, zero), as through the reference's gather.

    Returns:
        (B, N, D), dtype of ``visible`` (promoted with ``pos``'s).  Gradients reach ``visible``,
        ``mask_token`` (sum over masked positions) and ``pos`` (sum over the batch), reduced in fp32.
    """
    check_tensor("restore_tokens", "visible", visible)
    check_tensor("restore_tokens", "ids_restore", ids_restore)
    check_tensor("restore_tokens", "mask_token", mask_token)
    chosen = resolve_backend("restore_tokens", backend, visible, ids_restore, mask_token, pos)
    _check_restore(visible, ids_restore, mask_token, pos, check_range=True)
    if chosen == "reference":
        return _ref.restore_tokens(visible, ids_restore, mask_token, pos)
    return restore_tokens_fwd(visible, ids_restore, mask_token, pos)
