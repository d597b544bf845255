"""Fused KL losses: the Gaussian posterior KL to N(0, I) and the softmax KL feature alignment.

Chains: :mod:`rectok_fast.kernels.kl` (Triton) -> ``rectok_fast::gaussian_kl_fwd`` /
``rectok_fast::gaussian_kl_bwd`` and ``rectok_fast::kl_align_fwd`` / ``rectok_fast::kl_align_bwd``
(``torch.library.custom_op`` + fake + autograd) -> :func:`gaussian_kl` and :func:`kl_align_loss`.
"""

from __future__ import annotations

import math

import torch

from .. import reference
from .._backend import kernels, resolve_backend, triton_interpret
from .._constants import FLOAT_DTYPES, KERNEL_DTYPES
from .._validate import check_real, check_same_device, check_shape, check_tensor
from ..reference.posterior_flow import LOGVAR_MAX, LOGVAR_MIN
from ._launch import cdiv, next_power_of_2
from ._rowloss import (
    flatten_rows,
    register_row_loss_autograd,
    row_loss_bwd,
    row_loss_bwd_fake,
    row_loss_fwd,
    row_loss_fwd_fake,
    row_tile_config,
)

# ============================================================================= gaussian KL


def _split_config(B: int, L: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK, span, n_split, num_warps): each sample's L elements go to n_split programs of span elements."""
    interp = triton_interpret()  # the compile target decides, not the tensors' device
    block = min(next_power_of_2(max(L, 1)), 4096 if interp else 1024)
    n_chunks = cdiv(L, block)
    n_split = 1 if interp else min(n_chunks, max(1, 1024 // max(B, 1)))
    span = cdiv(n_chunks, n_split) * block
    n_split = cdiv(L, span)
    return block, span, n_split, 4 if block <= 1024 else 8  # 4 warps x 32 lanes x 8 bf16: 128-bit accesses


@torch.library.custom_op("rectok_fast::gaussian_kl_fwd", mutates_args=())
def gaussian_kl_fwd(mean: torch.Tensor, logvar: torch.Tensor, lo: float, hi: float, clamp: bool) -> torch.Tensor:
    """mean, logvar: (B, L) -> (B,) fp32 ``0.5·Σ(mean² + exp(lv) - 1 - lv)`` with lv clamped to [lo, hi]."""
    B, L = mean.shape
    if B == 0 or L == 0:
        return torch.zeros((B,), dtype=torch.float32, device=mean.device)
    block, span, n_split, num_warps = _split_config(B, L, mean.device)
    partial = torch.empty((B, n_split), dtype=torch.float32, device=mean.device)
    kernels("kl").gaussian_kl_fwd_kernel[(B, n_split)](
        mean,
        logvar,
        partial,
        L,
        span,
        n_split,
        mean.stride(0),
        mean.stride(1),
        logvar.stride(0),
        logvar.stride(1),
        float(lo),
        float(hi),
        CLAMP=clamp,
        BLOCK=block,
        num_warps=num_warps,
    )
    return partial.sum(1) if n_split > 1 else partial.reshape(B)


@gaussian_kl_fwd.register_fake
def _(mean, logvar, lo, hi, clamp):
    return mean.new_empty((mean.shape[0],), dtype=torch.float32)


@torch.library.custom_op("rectok_fast::gaussian_kl_bwd", mutates_args=())
def gaussian_kl_bwd(
    grad: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, lo: float, hi: float, clamp: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad: (B,) -> (dmean (B, L) in mean's dtype, dlogvar (B, L) in logvar's dtype)."""
    B, L = mean.shape
    dmean = torch.empty((B, L), dtype=mean.dtype, device=mean.device)
    dlogvar = torch.empty((B, L), dtype=logvar.dtype, device=logvar.device)
    if B == 0 or L == 0:
        return dmean, dlogvar
    block, span, n_split, num_warps = _split_config(B, L, mean.device)
    kernels("kl").gaussian_kl_bwd_kernel[(B, n_split)](
        grad.float().contiguous(),
        mean,
        logvar,
        dmean,
        dlogvar,
        L,
        span,
        mean.stride(0),
        mean.stride(1),
        logvar.stride(0),
        logvar.stride(1),
        float(lo),
        float(hi),
        CLAMP=clamp,
        BLOCK=block,
        num_warps=num_warps,
    )
    return dmean, dlogvar


@gaussian_kl_bwd.register_fake
def _(grad, mean, logvar, lo, hi, clamp):
    return mean.new_empty(mean.shape), logvar.new_empty(logvar.shape)


def _gkl_setup_context(ctx, inputs, output):
    mean, logvar, lo, hi, clamp = inputs
    ctx.save_for_backward(mean, logvar)
    ctx.args = (lo, hi, clamp)


def _gkl_backward(ctx, grad):
    mean, logvar = ctx.saved_tensors
    dmean, dlogvar = gaussian_kl_bwd(grad, mean, logvar, *ctx.args)
    return dmean, dlogvar, None, None, None


gaussian_kl_fwd.register_autograd(_gkl_backward, setup_context=_gkl_setup_context)


def gaussian_kl(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    *,
    logvar_clamp: tuple[float, float] | None = (LOGVAR_MIN, LOGVAR_MAX),
    backend: str = "auto",
) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch dim: (B,) fp32.

    Args:
        mean: (B, ...) posterior means (fp16, bf16, fp32 or fp64).
        logvar: same shape and device as ``mean`` (dtype may differ); clamped to ``logvar_clamp``
            (default [-30, 20], as the official DiagonalGaussian; ``None`` disables it) before use;
            the gradient passes where ``lo <= logvar <= hi`` (bounds included) and is 0 outside
            that range and where logvar is NaN (whose KL is NaN, as through the reference).
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (see :mod:`rectok_fast._backend`);
            fp64 inputs run the reference under ``"auto"``.

    Returns ``0.5·Σ(mean² + exp(logvar) - 1 - logvar)`` per sample, accumulated in fp32.
    """
    op = "gaussian_kl"
    check_tensor(op, "mean", mean, dtypes=FLOAT_DTYPES)
    check_tensor(op, "logvar", logvar, dtypes=FLOAT_DTYPES)
    if mean.dim() < 2:
        raise ValueError(f"{op}: `mean` must have rank >= 2 (B, ...), got shape {tuple(mean.shape)}")
    check_shape(op, "logvar", logvar, tuple(mean.shape))
    check_same_device(op, mean=mean, logvar=logvar)
    if logvar_clamp is not None:
        if len(logvar_clamp) != 2 or not float(logvar_clamp[0]) <= float(logvar_clamp[1]):
            raise ValueError(f"{op}: `logvar_clamp` must be None or (lo, hi) with lo <= hi, got {logvar_clamp!r}")
    chosen = resolve_backend(op, backend, mean, logvar, kernel_dtypes=KERNEL_DTYPES)
    if chosen == "reference":
        return reference.gaussian_kl(mean, logvar, logvar_clamp=logvar_clamp)
    B, L = mean.shape[0], math.prod(mean.shape[1:])  # reshape(B, -1) is ambiguous for B = 0
    lo, hi = (float(logvar_clamp[0]), float(logvar_clamp[1])) if logvar_clamp is not None else (0.0, 0.0)
    return gaussian_kl_fwd(mean.reshape(B, L), logvar.reshape(B, L), lo, hi, logvar_clamp is not None)


# ============================================================================= softmax KL alignment


def kl_align_tile(M: int, D: int, *, forward: bool = True) -> dict:
    """Launch meta of the kl_align kernels (``BLOCK_M``, ``BLOCK_D``, ``num_warps``, and ``EVEN_D``
    for the forward), decided by the compile target (:func:`rectok_fast._backend.triton_interpret`).

    GPU: one warp per program (``num_warps=1``) holding whole rows, so every row reduction of the
    online softmax is a warp shuffle (no shared memory, no barrier); D is streamed in chunks of up to
    1024 columns (32 per lane), preferring a power of two that divides D (no column masks).
    Interpreter: :func:`row_tile_config`'s large tiles (each program instance costs the same)."""
    if triton_interpret():
        block_m, block_d, num_warps = row_tile_config(M, D)
    else:
        block_d = min(next_power_of_2(max(D, 1)), 1024)
        if D % block_d and (D & -D) >= 256:
            block_d = min(D & -D, 1024)  # e.g. D = 768: three chunks of 256
        block_m = max(1, min(512 // block_d, next_power_of_2(max(M, 1))))
        num_warps = 1
    meta = {"BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": num_warps}
    if forward:
        meta["EVEN_D"] = D % block_d == 0
    return meta


def _kl_align_bwd_tile(M: int, D: int) -> dict:
    return kl_align_tile(M, D, forward=False)


# Per-row stats of the forward: the row max and the log of the shifted sum of each softmax, kept
# apart (not as one log-sum-exp) so the backward's ``(x/T - max) - log(sum)`` keeps full fp32
# precision for large logits, plus KL(p_t || p_s).
KL_ALIGN_STATS = 5


@torch.library.custom_op("rectok_fast::kl_align_fwd", mutates_args=())
def kl_align_fwd(
    student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """student, teacher: (M, D); weight: (M,) fp32 or None -> (loss 0-dim fp32, stats (M, 5) fp32)."""
    scalars = (1.0 / float(temperature), float(temperature) ** 2)
    return row_loss_fwd(
        ("kl", "kl_align_fwd_kernel"), student, teacher, weight, scalars, n_stats=KL_ALIGN_STATS, tile=kl_align_tile
    )


@kl_align_fwd.register_fake
def _(student, teacher, weight, temperature):
    return row_loss_fwd_fake(student, n_stats=KL_ALIGN_STATS)


@torch.library.custom_op("rectok_fast::kl_align_bwd", mutates_args=())
def kl_align_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    temperature: float,
    grad_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad: 0-dim -> (dstudent (M, D), dteacher (M, D) or (0,) when not grad_target)."""
    scalars = (1.0 / float(temperature), float(temperature))
    return row_loss_bwd(
        ("kl", "kl_align_bwd_kernel"),
        grad,
        student,
        teacher,
        weight,
        stats,
        scalars,
        grad_target,
        tile=_kl_align_bwd_tile,
    )


@kl_align_bwd.register_fake
def _(grad, student, teacher, weight, stats, temperature, grad_target):
    return row_loss_bwd_fake(student, teacher, grad_target)


register_row_loss_autograd(kl_align_fwd, kl_align_bwd)


def kl_align_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    *,
    grad_target: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean over (selected) tokens of ``T²·KL(softmax(teacher/T) || softmax(student/T))``, 0-dim fp32.

    Args:
        student: (..., D) student features; the softmax runs over the last dim.
        teacher: (..., D) teacher features, same shape and device (dtype may differ).
        temperature: finite T > 0; the ``T²`` factor keeps the gradient scale independent of T.
        mask: optional bool or float tensor of shape ``student.shape[:-1]`` as in
            :func:`rectok_fast.ops.cosine_align.cosine_align_loss` (mean over ``max(sum(mask), 1)``).
        grad_target: also differentiate with respect to ``teacher`` (detached otherwise).
        backend: ``"auto"`` | ``"triton"`` | ``"reference"``; fp64 runs the reference under ``"auto"``.

    Gradients: ``d/dstudent = g·w/count · T·(softmax(s/T) - softmax(t/T))`` and
    ``d/dteacher = g·w/count · T·p_t·(log p_t - log p_s - KL)`` per token.
    """
    op = "kl_align_loss"
    check_tensor(op, "student", student, dtypes=FLOAT_DTYPES)
    check_tensor(op, "teacher", teacher, dtypes=FLOAT_DTYPES)
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(f"{op}: `student` must have shape (..., D) with D >= 1, got {tuple(student.shape)}")
    check_shape(op, "teacher", teacher, tuple(student.shape))
    check_real(op, "temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: `temperature` must be a finite number > 0, got {temperature!r}")
    if mask is not None:
        check_tensor(op, "mask", mask, dtypes=(torch.bool,) + FLOAT_DTYPES)
        check_shape(op, "mask", mask, tuple(student.shape[:-1]))
    check_same_device(op, student=student, teacher=teacher, mask=mask)
    chosen = resolve_backend(op, backend, student, teacher, mask, kernel_dtypes=KERNEL_DTYPES, typed=(student, teacher))
    if chosen == "reference":
        return reference.kl_align_loss(student, teacher, temperature, mask, grad_target=grad_target)
    s2, t2, weight = flatten_rows(student, teacher, mask, grad_target)
    loss, _ = kl_align_fwd(s2, t2, weight, float(temperature))
    return loss


__all__ = ["gaussian_kl", "gaussian_kl_bwd", "gaussian_kl_fwd", "kl_align_bwd", "kl_align_fwd", "kl_align_loss"]
