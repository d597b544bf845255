"""Patch ops: ``patchify`` (image -> tokens) and ``unpatchify`` (tokens -> image).

Chain: C++/CUDA kernels in ``csrc/patchify_*.{cpp,cu}`` registered as ``torch.ops.rectok_fast.patchify``
/ ``unpatchify`` -> Python fakes (``register_fake``) and autograd (``register_autograd``; the
backward of each op is the other) -> the functionals :func:`patchify` / :func:`unpatchify`.

``backend``: ``"auto"`` runs the C++ op when the extension is loaded (and, for CUDA tensors, has CUDA
kernels), else the PyTorch reference; ``"cpp"`` raises when the C++ op cannot run; ``"reference"``
runs :mod:`rectok_fast.reference.patchify`.  The path that ran is readable with
``rectok_fast.last_backend("patchify")`` / ``last_backend("unpatchify")``.

``ids_keep`` (B, K) holds, per row, the indices of the kept grid cells (MAE's visible patches): they
must be in ``[0, N)`` and unique per row (then ``unpatchify`` with ``ids_keep`` is the exact adjoint
of ``patchify`` with ``ids_keep``; it writes every image element once, from an inverse map of the
ids, never a zero-fill followed by a scatter).  The functionals check this in eager mode (a host sync on CUDA);
under ``torch.compile`` or with the environment variable ``RECTOK_FAST_CHECK_INDICES=0`` the
data-dependent check is skipped (the CPU kernel still checks, the CUDA kernel never reads or writes
out of bounds: a token with an out-of-range id is zero in ``patchify`` and dropped in ``unpatchify``).
"""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .._constants import FLOAT_DTYPES, INDEX_DTYPES
from .._extension import load_extension
from .._validate import check_index_range, check_same_device, check_tensor, data_checks_active
from ..reference.patchify import patchify as _ref_patchify
from ..reference.patchify import unpatchify as _ref_unpatchify

HAS_EXTENSION: bool = load_extension() is not None and hasattr(torch.ops.rectok_fast, "patchify")
HAS_CUDA_KERNELS: bool = HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
    "rectok_fast::patchify", "CUDA"
)

# ---------------------------------------------------------------------------------------------
# fakes and autograd of the registered C++ ops
# ---------------------------------------------------------------------------------------------
if HAS_EXTENSION:

    def _same_device(ids_keep: torch.Tensor | None, data: torch.Tensor, name: str) -> None:
        # the dispatcher picks the Meta kernel (this fake) when any argument is a meta tensor, so
        # CPU data with meta ids would otherwise get an uninitialised CPU result
        if ids_keep is not None:
            torch._check(
                ids_keep.device == data.device,
                lambda: f"ids_keep is on {ids_keep.device} but {name} is on {data.device}; move them to one device",
            )

    @torch.library.register_fake("rectok_fast::patchify")
    def _patchify_fake(images: torch.Tensor, p: int, ids_keep: torch.Tensor | None) -> torch.Tensor:
        _same_device(ids_keep, images, "images")
        torch._check(images.dim() == 4, lambda: "images must have shape (B, C, H, W)")
        B, C, H, W = images.shape
        torch._check(H % p == 0 and W % p == 0, lambda: f"images spatial size must be divisible by p = {p}")
        T = ids_keep.shape[1] if ids_keep is not None else (H // p) * (W // p)
        return images.new_empty((B, T, C * p * p))

    @torch.library.register_fake("rectok_fast::unpatchify")
    def _unpatchify_fake(
        tokens: torch.Tensor, p: int, channels: int, gh: int, gw: int, ids_keep: torch.Tensor | None
    ) -> torch.Tensor:
        _same_device(ids_keep, tokens, "tokens")
        torch._check(tokens.dim() == 3, lambda: "tokens must have shape (B, T, C*p*p)")
        torch._check(tokens.shape[2] == channels * p * p, lambda: "tokens last dim must be channels*p*p")
        if ids_keep is None:
            torch._check(tokens.shape[1] == gh * gw, lambda: "tokens must have gh*gw tokens")
        return tokens.new_empty((tokens.shape[0], channels, gh * p, gw * p))

    def _patchify_setup(ctx, inputs, output):
        images, p, ids_keep = inputs
        ctx.p = p
        ctx.shape = (images.shape[1], images.shape[2] // p, images.shape[3] // p)
        ctx.has_ids = ids_keep is not None
        if ids_keep is not None:
            ctx.save_for_backward(ids_keep)

    def _patchify_backward(ctx, grad):
        ids_keep = ctx.saved_tensors[0] if ctx.has_ids else None
        C, gh, gw = ctx.shape
        return torch.ops.rectok_fast.unpatchify(grad, ctx.p, C, gh, gw, ids_keep), None, None

    def _unpatchify_setup(ctx, inputs, output):
        _tokens, p, _channels, _gh, _gw, ids_keep = inputs
        ctx.p = p
        ctx.has_ids = ids_keep is not None
        if ids_keep is not None:
            ctx.save_for_backward(ids_keep)

    def _unpatchify_backward(ctx, grad):
        ids_keep = ctx.saved_tensors[0] if ctx.has_ids else None
        return torch.ops.rectok_fast.patchify(grad, ctx.p, ids_keep), None, None, None, None, None

    torch.library.register_autograd("rectok_fast::patchify", _patchify_backward, setup_context=_patchify_setup)
    torch.library.register_autograd("rectok_fast::unpatchify", _unpatchify_backward, setup_context=_unpatchify_setup)


# ---------------------------------------------------------------------------------------------
# validation and backend choice
# ---------------------------------------------------------------------------------------------
def _check_pos_int(op: str, name: str, v: object, *, allow_zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: `{name}` must be an int, got {type(v).__name__}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{op}: `{name}` must be {'>= 0' if allow_zero else 'positive'}, got {v}")
    return v


def _check_ids(
    op: str, ids_keep: object, B: int, n_cells: int, ref: torch.Tensor, K: int | None = None
) -> torch.Tensor:
    ids = check_tensor(op, "ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES)
    check_same_device(op, **{"tokens" if K is not None else "images": ref, "ids_keep": ids})
    if ids.shape[0] != B or (K is not None and ids.shape[1] != K):
        raise ValueError(f"{op}: `ids_keep` must have shape ({B}, {'K' if K is None else K}), got {tuple(ids.shape)}")
    ids = ids.long()
    check_index_range(op, "ids_keep", ids, n_cells)
    if data_checks_active(ids):  # a host sync: eager only, off with RECTOK_FAST_CHECK_INDICES=0
        srt = ids.sort(dim=1).values
        if bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError(f"{op}: `ids_keep` has duplicate entries in a row; the kept grid cells must be unique")
    return ids


def _cpp_unavailable(device: torch.device) -> str | None:
    """Why the C++ op cannot run on ``device`` (None when it can): the extension has CPU kernels,
    and CUDA kernels when it was built with a CUDA toolkit."""
    if not HAS_EXTENSION:
        return "the C++ extension rectok_fast._C is not built"
    if device.type == "cpu" or (device.type == "cuda" and HAS_CUDA_KERNELS):
        return None
    return f"no kernel for {device}"


def _resolve(op: str, backend: str, device: torch.device) -> str:
    return resolve_backend(op, backend, fused="cpp", unavailable=_cpp_unavailable(device))


# ---------------------------------------------------------------------------------------------
# functionals
# ---------------------------------------------------------------------------------------------
def patchify(
    images: torch.Tensor, patch_size: int, ids_keep: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """Split images into flattened patches.

    Args:
        images: (B, C, H, W) float32/float64/float16/bfloat16, H and W divisible by ``patch_size``.
        patch_size: p.
        ids_keep: optional (B, K) int64/int32 indices in [0, N) of the grid cells to keep, unique per row.
            Checked in eager mode (``ValueError`` naming ``ids_keep``; a host sync on CUDA), skipped
            under ``torch.compile`` and with ``RECTOK_FAST_CHECK_INDICES=0``.
        backend: ``"auto"`` | ``"cpp"`` | ``"reference"``.

    Returns:
        (B, N, C·p·p) tokens, N = (H/p)·(W/p) row-major over the grid, each flattened in (c, py, px)
        order (a Linear over it equals ``Conv2d(C, d, p, stride=p)``); with ``ids_keep`` (B, K, C·p·p).
    """
    op = "patchify"
    check_tensor(op, "images", images, ndim=4, dtypes=FLOAT_DTYPES)
    p = _check_pos_int(op, "patch_size", patch_size)
    B, _C, H, W = images.shape
    if H % p or W % p:
        raise ValueError(f"{op}: `images` spatial size ({H}, {W}) must be divisible by `patch_size` = {p}")
    ids = None if ids_keep is None else _check_ids(op, ids_keep, B, (H // p) * (W // p), images)
    if _resolve(op, backend, images.device) == "cpp":
        return torch.ops.rectok_fast.patchify(images, p, ids)
    return _ref_patchify(images, p, ids)


def unpatchify(
    tokens: torch.Tensor,
    patch_size: int,
    channels: int,
    grid: int | tuple[int, int],
    *,
    ids_keep: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        tokens: (B, gh·gw, C·p·p), or (B, K, C·p·p) with ``ids_keep``.
        patch_size: p.
        channels: C.
        grid: gh (= gw) or (gh, gw).
        ids_keep: optional (B, K) indices of the grid cells the K tokens belong to (unique per row);
            the other cells are zero (the adjoint of ``patchify(..., ids_keep)``).  Checked as in
            :func:`patchify` (eager only; ``RECTOK_FAST_CHECK_INDICES=0`` turns it off).
        backend: ``"auto"`` | ``"cpp"`` | ``"reference"``.

    Returns:
        (B, C, gh·p, gw·p) images.
    """
    op = "unpatchify"
    check_tensor(op, "tokens", tokens, ndim=3, dtypes=FLOAT_DTYPES)
    p = _check_pos_int(op, "patch_size", patch_size)
    C = _check_pos_int(op, "channels", channels)
    if isinstance(grid, (tuple, list)):
        if len(grid) != 2:
            raise ValueError(f"{op}: `grid` must be an int or a pair (gh, gw), got {grid!r}")
        gh, gw = (_check_pos_int(op, "grid", g, allow_zero=True) for g in grid)
    else:
        gh = gw = _check_pos_int(op, "grid", grid, allow_zero=True)
    B, T, D = tokens.shape
    if D != C * p * p:
        raise ValueError(f"{op}: `tokens` last dim must be channels*patch_size**2 = {C * p * p}, got {D}")
    if ids_keep is None:
        if T != gh * gw:
            raise ValueError(f"{op}: `tokens` must have gh*gw = {gh * gw} tokens for grid ({gh}, {gw}), got {T}")
        ids = None
    else:
        ids = _check_ids(op, ids_keep, B, gh * gw, tokens, K=T)
    if _resolve(op, backend, tokens.device) == "cpp":
        return torch.ops.rectok_fast.unpatchify(tokens, p, C, gh, gw, ids)
    return _ref_unpatchify(tokens, p, C, (gh, gw), ids)


__all__ = ["HAS_CUDA_KERNELS", "HAS_EXTENSION", "patchify", "unpatchify"]
