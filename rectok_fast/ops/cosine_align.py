"""Fused cosine alignment loss: ``mean over selected tokens of relu(1 - cos(pred, target) - margin)``.

Chain: :mod:`rectok_fast.kernels.cosine_align` (Triton) -> ``rectok_fast::cosine_align_fwd`` /
``rectok_fast::cosine_align_bwd`` (``torch.library.custom_op`` + fake + autograd) ->
:func:`cosine_align_loss` (validation, backend choice).  The forward keeps only 3 fp32 stats per
token (dot, ||pred||, ||target||); the backward reads pred and target once and recomputes
``dcos/dpred = t/(|p||t|) - cos·p/|p|²`` from them.
"""

from __future__ import annotations

import torch
import triton

from .. import reference
from .._backend import record, resolve_triton_backend
from .._validate import check_same_device, check_shape, check_tensor
from ..kernels.cosine_align import cosine_align_bwd_kernel, cosine_align_fwd_kernel

OP = "cosine_align_loss"
EPS = 1e-8
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def row_tile_config(M: int, D: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for row-wise kernels over (M, D) that loop over D.

    BLOCK_D <= 1024, so wider rows loop over D.  On a GPU a tile holds ~4096 elements; under the
    CPU interpreter, where each program instance costs about the same whatever its size, tiles hold
    up to 16x more rows.
    """
    interp = device.type == "cpu"
    block_d = min(triton.next_power_of_2(max(D, 1)), 1024)
    budget = 65536 if interp else 4096
    block_m = max(1, min(budget // block_d, triton.next_power_of_2(max(M, 1))))
    num_warps = 4 if block_m * block_d <= 2048 else 8
    return block_m, block_d, num_warps


def kernel_backend(op: str, backend: str, chosen: str, *tensors: torch.Tensor) -> str:
    """fp64 inputs run the reference under ``"auto"`` and raise under ``"triton"`` (the kernels are fp32)."""
    if chosen == "triton" and any(t.dtype not in KERNEL_DTYPES for t in tensors):
        if backend == "triton":
            raise TypeError(
                f"{op}: backend='triton' supports fp16/bf16/fp32 inputs, got {[str(t.dtype) for t in tensors]}"
            )
        chosen = "reference"
        record(op, chosen)
    return chosen


def _count(weight: torch.Tensor | None, M: int, device: torch.device) -> torch.Tensor:
    """Denominator of the mean (0-dim fp32): number of tokens, or the clamped sum of the weights."""
    if weight is None:
        return torch.full((), float(M), dtype=torch.float32, device=device)
    return weight.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("rectok_fast::cosine_align_fwd", mutates_args=())
def cosine_align_fwd(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target: (M, D); weight: (M,) fp32 or None -> (loss 0-dim fp32, stats (M, 3) fp32)."""
    M, D = pred.shape
    stats = torch.empty((M, 3), dtype=torch.float32, device=pred.device)
    rowloss = torch.empty((M,), dtype=torch.float32, device=pred.device)
    if M > 0:
        block_m, block_d, num_warps = row_tile_config(M, D, pred.device)
        cosine_align_fwd_kernel[(triton.cdiv(M, block_m),)](
            pred,
            target,
            weight if weight is not None else rowloss,
            stats,
            rowloss,
            M,
            D,
            pred.stride(0),
            pred.stride(1),
            target.stride(0),
            target.stride(1),
            float(margin),
            EPS,
            HAS_WEIGHT=weight is not None,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    loss = rowloss.sum() / _count(weight, M, pred.device)
    return loss, stats


@cosine_align_fwd.register_fake
def _(pred, target, weight, margin):
    M = pred.shape[0]
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((M, 3), dtype=torch.float32)


@torch.library.custom_op("rectok_fast::cosine_align_bwd", mutates_args=())
def cosine_align_bwd(
    grad: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    margin: float,
    grad_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad: 0-dim -> (dpred (M, D) in pred's dtype, dtarget (M, D) or (0,) when not grad_target)."""
    M, D = pred.shape
    dpred = torch.empty((M, D), dtype=pred.dtype, device=pred.device)
    dtarget = torch.empty((M, D) if grad_target else (0,), dtype=target.dtype, device=target.device)
    if M > 0 and D > 0:
        scale = (grad.float() / _count(weight, M, pred.device)).contiguous()
        block_m, block_d, num_warps = row_tile_config(M, D, pred.device)
        cosine_align_bwd_kernel[(triton.cdiv(M, block_m),)](
            pred,
            target,
            weight if weight is not None else stats,
            stats,
            scale,
            dpred,
            dtarget if grad_target else dpred,
            M,
            D,
            pred.stride(0),
            pred.stride(1),
            target.stride(0),
            target.stride(1),
            float(margin),
            EPS,
            HAS_WEIGHT=weight is not None,
            GRAD_TARGET=grad_target,
            BLOCK_M=block_m,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return dpred, dtarget


@cosine_align_bwd.register_fake
def _(grad, pred, target, weight, stats, margin, grad_target):
    dpred = pred.new_empty(pred.shape)
    dtarget = target.new_empty(target.shape if grad_target else (0,))
    return dpred, dtarget


def _setup_context(ctx, inputs, output):
    pred, target, weight, margin = inputs
    _, stats = output
    ctx.save_for_backward(pred, target, weight, stats)
    ctx.margin = margin
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_loss, grad_stats):
    pred, target, weight, stats = ctx.saved_tensors
    grad_target = bool(ctx.needs_input_grad[1])
    dpred, dtarget = cosine_align_bwd(grad_loss, pred, target, weight, stats, ctx.margin, grad_target)
    return dpred, (dtarget if grad_target else None), None, None


cosine_align_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional


def cosine_align_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    margin: float = 0.0,
    *,
    grad_target: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean over the selected tokens of ``relu(1 - cos(pred, target) - margin)``, a 0-dim fp32 tensor.

    Args:
        pred: (..., D) predicted features (fp16, bf16, fp32 or fp64).
        target: (..., D) target features, same shape and device as ``pred`` (dtype may differ).
        mask: optional bool or float tensor of shape ``pred.shape[:-1]``; True/nonzero tokens are
            counted (float values weight them).  The mean divides by ``max(sum(mask), 1)``, so no
            selected token gives a loss of 0 and zero gradients.
        margin: tokens with ``1 - cos <= margin`` contribute 0 (and no gradient).
        grad_target: also differentiate with respect to ``target`` (detached otherwise).
        backend: ``"auto"`` (Triton on CUDA tensors, else the PyTorch reference), ``"triton"`` or
            ``"reference"``; :func:`rectok_fast.last_backend` says which ran.  fp64 inputs run the
            reference under ``"auto"``.

    ``cos`` divides by each norm clamped to 1e-8; statistics are accumulated in fp32.
    """
    check_tensor(OP, "pred", pred, dtypes=FLOAT_DTYPES)
    check_tensor(OP, "target", target, dtypes=FLOAT_DTYPES)
    if pred.dim() < 1:
        raise ValueError(f"{OP}: `pred` must have rank >= 1 (..., D), got shape {tuple(pred.shape)}")
    if pred.shape[-1] == 0:
        raise ValueError(f"{OP}: `pred` has an empty feature dim, shape {tuple(pred.shape)}")
    check_shape(OP, "target", target, tuple(pred.shape))
    if mask is not None:
        check_tensor(OP, "mask", mask, dtypes=(torch.bool,) + FLOAT_DTYPES)
        check_shape(OP, "mask", mask, tuple(pred.shape[:-1]))
    check_same_device(OP, pred=pred, target=target, mask=mask)
    chosen = kernel_backend(OP, backend, resolve_triton_backend(OP, backend, pred, target, mask), pred, target)
    if chosen == "reference":
        return reference.cosine_align_loss(pred, target, mask, margin, grad_target=grad_target)
    D = pred.shape[-1]
    p2 = pred.reshape(-1, D)
    t2 = target.reshape(-1, D)
    if not grad_target:
        t2 = t2.detach()
    weight = None if mask is None else mask.detach().reshape(-1).to(torch.float32).contiguous()
    loss, _ = cosine_align_fwd(p2, t2, weight, float(margin))
    return loss


__all__ = ["cosine_align_bwd", "cosine_align_fwd", "cosine_align_loss", "row_tile_config"]
