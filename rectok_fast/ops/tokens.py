"""Token selection for MAE-style masking: ``gather_tokens`` (keep the visible tokens / RoPE rows)
and ``restore_tokens`` (insert mask tokens and un-shuffle).

Chain: launchers (validate, allocate, launch :mod:`rectok_fast.kernels.tokens`) ->
``torch.library.custom_op`` ops ``rectok_fast::gather_tokens_fwd/_bwd`` and
``rectok_fast::restore_tokens_fwd/_bwd`` with fake implementations -> ``register_autograd`` ->
the functionals :func:`gather_tokens` and :func:`restore_tokens`.

Both backwards are deterministic (no atomics): ``gather_tokens`` sorts the destination rows and
runs a segment sum; ``restore_tokens`` scatters through the permutation and reduces the mask-token
and position gradients in fp32 (fp64 for fp64 inputs) with a fixed order.
"""

from __future__ import annotations

import torch
import triton

from rectok_fast._backend import resolve_triton_backend, triton_interpret
from rectok_fast._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_index_range,
    check_same_device,
    check_shape,
    check_tensor,
)
from rectok_fast.kernels.tokens import (
    gather_tokens_fwd_kernel,
    restore_tokens_bwd_kernel,
    restore_tokens_fwd_kernel,
    segment_sum_rows_kernel,
)
from rectok_fast.reference import tokens as _ref

__all__ = ["gather_tokens", "restore_tokens"]

# The Triton interpreter truncates float -> bf16 casts; the kernels then round with integer ops so that
# CPU runs are bitwise equal to compiled ones (decided when this module is imported, like @triton.jit).
_RTNE_BF16 = triton_interpret()
_BLOCK_TOKENS = 16  # tokens (rows) per program
_MAX_BLOCK_D = 256  # feature chunk streamed per loop iteration / per program
_BLOCK_D_RESTORE_BWD = 64  # restore backward loops over the batch: tile D finer for more programs


def _block_d(D: int, cap: int = _MAX_BLOCK_D) -> int:
    return min(triton.next_power_of_2(max(D, 1)), cap)


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
        check_index_range(op, "ids_restore", ids_restore, N)
    return B, K, N, D


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
    n_kblocks = triton.cdiv(K, bk)
    gather_tokens_fwd_kernel[(B * n_kblocks,)](
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


def _gather_bwd(
    grad_out: torch.Tensor, ids_keep: torch.Tensor, num_rows: int, shared: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Segment-sum ``grad_out`` rows into (num_rows, D) if ``shared`` else (B, num_rows, D)."""
    B, K, D = grad_out.shape
    R = num_rows if shared else B * num_rows
    out_shape = (num_rows, D) if shared else (B, num_rows, D)
    if B * K == 0 or R * D == 0:
        return torch.zeros(out_shape, device=grad_out.device, dtype=dtype)
    keys = ids_keep.to(torch.int64)
    valid = (keys >= 0) & (keys < num_rows)  # out-of-range ids (zero rows forward) add nowhere
    if not shared:
        keys = keys + torch.arange(B, device=keys.device, dtype=torch.int64).unsqueeze(1) * num_rows
    keys = torch.where(valid, keys, -1)  # sorted before offsets[0]: never summed
    sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
    offsets = torch.searchsorted(sorted_keys, torch.arange(R + 1, device=keys.device, dtype=torch.int64))
    dst = torch.empty(out_shape, device=grad_out.device, dtype=dtype)
    br, bd = _BLOCK_TOKENS, _block_d(D)
    fp64 = dtype == torch.float64 or grad_out.dtype == torch.float64
    segment_sum_rows_kernel[(triton.cdiv(R, br), triton.cdiv(D, bd))](
        grad_out,
        order,
        offsets,
        dst,
        R,
        K,
        D,
        grad_out.stride(0),
        grad_out.stride(1),
        grad_out.stride(2),
        FP64=fp64,
        RTNE_BF16=_RTNE_BF16,
        BLOCK_R=br,
        BLOCK_D=bd,
        num_warps=_num_warps(br, bd),
    )
    return dst


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
    n_nblocks = triton.cdiv(N, bn)
    restore_tokens_fwd_kernel[(B * n_nblocks,)](
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
    # zero-initialised: a valid ids_restore (a permutation) overwrites every row, an invalid one
    # leaves zeros rather than uninitialised memory
    g_vis = torch.zeros((B, K, D), device=dev, dtype=visible_dtype)
    g_pos = torch.empty((N, D) if has_pos else (0,), device=dev, dtype=pos_dtype)
    fp64 = torch.float64 in (grad_out.dtype, visible_dtype, mask_dtype) or (has_pos and pos_dtype == torch.float64)
    acc_dtype = torch.float64 if fp64 else torch.float32
    if B * N * D == 0:
        if has_pos:
            g_pos.zero_()
        return g_vis, torch.zeros((D,), device=dev, dtype=mask_dtype), g_pos
    bn, bd = _BLOCK_TOKENS, _block_d(D, _BLOCK_D_RESTORE_BWD)
    n_nblocks = triton.cdiv(N, bn)
    part = torch.empty((n_nblocks, D), device=dev, dtype=acc_dtype)
    gv = g_vis if K > 0 else part  # K = 0: every store is masked off; any valid pointer will do
    gp = g_pos if has_pos else part
    restore_tokens_bwd_kernel[(n_nblocks, triton.cdiv(D, bd))](
        grad_out,
        ids_restore,
        gv,
        part,
        gp,
        B,
        K,
        N,
        D,
        grad_out.stride(0),
        grad_out.stride(1),
        grad_out.stride(2),
        ids_restore.stride(0),
        ids_restore.stride(1),
        HAS_POS=has_pos,
        FP64=fp64,
        RTNE_BF16=_RTNE_BF16,
        BLOCK_N=bn,
        BLOCK_D=bd,
        num_warps=_num_warps(bn, bd),
    )
    return g_vis, part.sum(0).to(mask_dtype), g_pos


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
    grad_out: torch.Tensor, ids_keep: torch.Tensor, num_rows: int, shared: bool, dtype: torch.dtype
) -> torch.Tensor:
    return _gather_bwd(grad_out, ids_keep, num_rows, shared, dtype)


@gather_tokens_bwd.register_fake
def _(grad_out, ids_keep, num_rows, shared, dtype):
    B, _, D = grad_out.shape
    return grad_out.new_empty((num_rows, D) if shared else (B, num_rows, D), dtype=dtype)


def _gather_setup_context(ctx, inputs, output):
    x, ids_keep, pos = inputs
    ctx.save_for_backward(ids_keep)
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.shared = x.dim() == 2 or x.shape[0] == 1
    ctx.pos_shape = None if pos is None else pos.shape
    ctx.pos_dtype = None if pos is None else pos.dtype


def _gather_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    N = ctx.x_shape[-2]
    gx = gpos = None
    if ctx.needs_input_grad[0]:
        gx = gather_tokens_bwd(grad, ids_keep, N, ctx.shared, ctx.x_dtype).reshape(ctx.x_shape)
    if ctx.pos_shape is not None and ctx.needs_input_grad[2]:
        gpos = gather_tokens_bwd(grad, ids_keep, N, True, ctx.pos_dtype).reshape(ctx.pos_shape)
    return gx, None, gpos


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
    chosen = resolve_triton_backend("gather_tokens", backend, x, ids_keep, pos)
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
        ids_restore: (B, N) int32/int64, each row a permutation of 0..N-1 (N >= K).
        mask_token: (D,) or (1, 1, D) learned mask token (cast to ``visible``'s dtype).
        pos: optional (N, D) or (1, N, D) position embedding.
        backend: ``"auto"`` (Triton on CUDA, the reference otherwise), ``"triton"`` or ``"reference"``.

    Raises:
        ValueError: naming ``ids_restore`` when an entry is outside [0, N).  This eager check reads
            the ids back to the host (a device sync); it is skipped under ``torch.compile`` and when
            the environment variable ``RECTOK_FAST_CHECK_INDICES=0``.  Without it the Triton path
            inserts the mask token wherever an id is outside [0, K) (negative ones included).

    Returns:
        (B, N, D), dtype of ``visible`` (promoted with ``pos``'s).  Gradients reach ``visible``,
        ``mask_token`` (sum over masked positions) and ``pos`` (sum over the batch), reduced in fp32.
    """
    check_tensor("restore_tokens", "visible", visible)
    check_tensor("restore_tokens", "ids_restore", ids_restore)
    check_tensor("restore_tokens", "mask_token", mask_token)
    chosen = resolve_triton_backend("restore_tokens", backend, visible, ids_restore, mask_token, pos)
    _check_restore(visible, ids_restore, mask_token, pos, check_range=True)
    if chosen == "reference":
        return _ref.restore_tokens(visible, ids_restore, mask_token, pos)
    return restore_tokens_fwd(visible, ids_restore, mask_token, pos)
