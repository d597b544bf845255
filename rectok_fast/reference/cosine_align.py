"""Reference of the cosine alignment loss (the semantic term of RecTok, method §3)."""

from __future__ import annotations

import torch

from ._upcast import result, up

EPS = 1e-8


def cosine_align_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    margin: float = 0.0,
    *,
    grad_target: bool = False,
    upcast: bool = True,
) -> torch.Tensor:
    """Mean over the selected tokens of ``relu(1 - cos(pred, target) - margin)`` (0-dim fp32; fp64 for fp64 inputs).

    pred, target: (..., D); mask: optional bool/0-1 tensor of shape ``pred.shape[:-1]`` selecting
    tokens (True = counted).  No selected token gives 0.  ``cos`` divides by each norm clamped to
    1e-8.  The target is detached unless ``grad_target``.
    """
    if not grad_target:
        target = target.detach()
    pred, target = up(pred, upcast), up(target, upcast)
    pn = pred.norm(dim=-1).clamp_min(EPS)
    tn = target.norm(dim=-1).clamp_min(EPS)
    cos = (pred * target).sum(-1) / (pn * tn)
    per_token = result(torch.relu(1.0 - cos - margin))
    if mask is None:
        return per_token.mean()
    w = mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)
