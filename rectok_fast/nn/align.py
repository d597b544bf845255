"""Token-structure alignment losses (VA-VAE's vision-foundation loss pieces) as nn.Modules."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..ops.distmat import check_margin


def _tokens_last(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, ..., D, ...) with the feature axis at ``dim`` -> (B, N, D) with N the product of the
    other non-batch axes; a view whenever the layout allows (e.g. channels-first (B, D, H, W))."""
    if x.dim() < 2:
        raise ValueError(f"DistMatAlignLoss: features must have rank >= 2 (B, ..., D), got shape {tuple(x.shape)}")
    d = dim % x.dim()
    if d == 0:
        raise ValueError("DistMatAlignLoss: the feature `dim` cannot be the batch axis 0")
    x = x.movedim(d, -1)
    if x.dim() == 2:  # (B, D): one token per sample
        return x.unsqueeze(1)
    return x.flatten(1, -2)


class DistMatAlignLoss(nn.Module):
    """VA-VAE's marginal distance-matrix loss: ``mean over b, i, j of relu(|cos(s_i, s_j) − cos(t_i, t_j)| − margin)``.

    ``forward(student, teacher)``: student (B, N, D) (or any layout with the feature axis at
    ``dim``, e.g. channels-first latents (B, D, H, W) with ``dim=1``), teacher (B, N, Dt) (feature
    axis ``teacher_dim``); both must flatten to the same N tokens per sample, D may differ from Dt.
    Fused on CUDA (:func:`rectok_fast.ops.distmat_align_loss`: the N×N cosine matrices are never
    written), the PyTorch reference elsewhere.  The teacher gets no gradient unless ``grad_target``.

    Example (VA-VAE's VF loss, distance-matrix half)::

        loss_fn = DistMatAlignLoss(margin=0.25, dim=1)
        loss = loss_fn(proj(z), dinov2_tokens)      # z (B, C, H, W), tokens (B, H·W, Dt)
    """

    def __init__(
        self,
        margin: float = 0.0,
        *,
        dim: int = -1,
        teacher_dim: int = -1,
        grad_target: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.margin = check_margin("DistMatAlignLoss", margin)
        self.dim, self.teacher_dim, self.grad_target, self.backend = dim, teacher_dim, grad_target, backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """0-dim fp32 loss."""
        s = _tokens_last(student, self.dim)
        t = _tokens_last(teacher, self.teacher_dim)
        return ops.distmat_align_loss(s, t, self.margin, grad_target=self.grad_target, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, dim={self.dim}, teacher_dim={self.teacher_dim}, "
            f"grad_target={self.grad_target}, backend={self.backend!r}"
        )
