"""Reference of the DiT velocity flow matching (method §4): the model input ``x_t`` and the loss."""

from __future__ import annotations

import torch

from ._upcast import up


def _bt(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def flow_matching_xt(x1: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, *, upcast: bool = False) -> torch.Tensor:
    """``x_t = t·x1 + (1 - t)·x0`` (t = 1 is the data end, method §4); x1, x0: (B, ...), t: (B,).
    Returns the dtype of ``x1``."""
    x = up(x1, upcast)
    tt = _bt(t, x)
    return (tt * x + (1 - tt) * x0.to(x.dtype)).to(x1.dtype)


COSINE_EPS = 1e-8  # F.cosine_similarity's default


def velocity_cosine_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """LightningDiT's cosine term ``mean over (b, spatial) of 1 − cos(pred, target)`` over the channel
    dim 1 of (B, C, ...) velocities, cos as ``F.cosine_similarity(dim=1, eps=eps)``:
    ``pred·target / (max(‖pred‖, eps)·max(‖target‖, eps))`` (each norm clamped on its own).  Computed in
    the dtype of the inputs (fp64 stays fp64: gradcheck)."""
    return (1 - torch.nn.functional.cosine_similarity(pred, target, dim=1, eps=eps)).mean()


def flow_matching_loss(
    pred: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor,
    x0: torch.Tensor,
    *,
    cosine_weight: float = 0.0,
    upcast: bool = False,
) -> torch.Tensor:
    """Velocity flow-matching loss ``mean((pred - (x1 - x0))²)`` over every element, a 0-dim fp32 tensor
    (also for fp64 inputs, like the fused op; ``upcast`` computes the difference in fp32/fp64 first).

    ``cosine_weight`` != 0 adds LightningDiT's ``cosine_weight · velocity_cosine_loss(pred, x1 − x0)``
    (channel dim 1 of (B, C, ...) inputs; computed in fp32, fp64 kept) to the mean squared error.

    ``t`` does not enter the loss (the target ``x1 - x0`` is time-independent) but is part of the
    signature so the fused op can regenerate ``x0`` and check shapes the same way.
    """
    del t
    pred, x1, x0 = up(pred, upcast), up(x1, upcast), up(x0, upcast)
    target = x1 - x0.to(x1.dtype)
    loss = (pred - target).float().pow(2).mean()
    if cosine_weight:
        if pred.dim() < 2:
            raise ValueError("flow_matching_loss: the cosine term needs a channel dim (B, C, ...)")
        loss = loss + cosine_weight * velocity_cosine_loss(up(pred), up(target)).float()
    return loss
