"""Fused cosine alignment loss: ``mean over selected tokens of relu(1 - cos(pred, target) - margin)``.

Chain: :mod:`rectok_fast.kernels.cosine_align` (Triton) -> ``rectok_fast::cosine_align_fwd`` /
``rectok_fast::cosine_align_bwd`` (``torch.library.custom_op`` + fake + autograd) ->
:func:`cosine_align_loss` (validation, backend choice).  The forward keeps only 3 fp32 stats per
token (dot, ||pred||, ||target||); the backward reads pred and target once and recomputes
``dcos/dpred = t/(|p||t|) - cos·p/|p|²`` from them.
"""

from __future__ import annotations

import torch

from .. import reference
from .._backend import resolve_backend
from .._constants import FLOAT_DTYPES, KERNEL_DTYPES
from .._validate import check_real, check_same_device, check_shape, check_tensor
from ._rowloss import (
    flatten_rows,
    register_row_loss_autograd,
    row_loss_bwd,
    row_loss_bwd_fake,
    row_loss_fwd,
    row_loss_fwd_fake,
    row_tile_config,
)

OP = "cosine_align_loss"
EPS = 1e-8


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("rectok_fast::cosine_align_fwd", mutates_args=())
def cosine_align_fwd(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target: (M, D); weight: (M,) fp32 or None -> (loss 0-dim fp32, stats (M, 3) fp32)."""
    return row_loss_fwd(("cosine_align", "cosine_align_fwd_kernel"), pred, target, weight, (float(margin), EPS))


@cosine_align_fwd.register_fake
def _(pred, target, weight, margin):
    return row_loss_fwd_fake(pred)


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
    kernel = ("cosine_align", "cosine_align_bwd_kernel")
    return row_loss_bwd(kernel, grad, pred, target, weight, stats, (float(margin), EPS), grad_target)


@cosine_align_bwd.register_fake
def _(grad, pred, target, weight, stats, margin, grad_target):
    return row_loss_bwd_fake(pred, target, grad_target)


register_row_loss_autograd(cosine_align_fwd, cosine_align_bwd)


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
        margin: a number; tokens with ``1 - cos <= margin`` contribute 0 (and no gradient).  NaN
            and Inf propagate as through the reference (``margin=nan`` gives a NaN loss).
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
    check_real(OP, "margin", margin)
    check_same_device(OP, pred=pred, target=target, mask=mask)
    chosen = resolve_backend(OP, backend, pred, target, mask, kernel_dtypes=KERNEL_DTYPES, typed=(pred, target))
    if chosen == "reference":
        return reference.cosine_align_loss(pred, target, mask, margin, grad_target=grad_target)
    p2, t2, weight = flatten_rows(pred, target, mask, grad_target)
    loss, _ = cosine_align_fwd(p2, t2, weight, float(margin))
    return loss


__all__ = ["cosine_align_bwd", "cosine_align_fwd", "cosine_align_loss", "row_tile_config"]
