from __future__ import annotations

import torch


def _bt(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def flow_matching_xt(x1: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``x_t = t·x1 + (1 - t)·x0`` (t = 1 is the data end, SPEC §4); x1, x0: (B, ...), t: (B,)."""
    tt = _bt(t, x1)
    return tt * x1 + (1 - tt) * x0.to(x1.dtype)


def flow_matching_loss(
    pred: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, *, upcast: bool = False
) -> torch.Tensor:
    """Velocity flow-matching loss ``mean((pred - (x1 - x0))²)`` over every element, a 0-dim fp32 tensor.

    ``t`` does not enter the loss (the target ``x1 - x0`` is time-independent) but is part of the
    signature so the fused op can regenerate ``x0`` and check shapes the same way.
    """
    del t
    if upcast:
        pred, x1, x0 = pred.float(), x1.float(), x0.float()
    return (pred - (x1 - x0.to(x1.dtype))).float().pow(2).mean()
