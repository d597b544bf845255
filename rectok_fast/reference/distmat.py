"""Reference of the distance-matrix alignment loss (VA-VAE's marginal distance-matrix term)."""

from __future__ import annotations

import torch

from ._upcast import result, up

EPS = 1e-8


def distmat_align_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    margin: float = 0.0,
    *,
    grad_target: bool = False,
    upcast: bool = True,
) -> torch.Tensor:
    """``mean over b, i, j of relu(|cos(s_i, s_j) - cos(t_i, t_j)| - margin)`` (0-dim fp32; fp64 for fp64).

    student: (B, N, D); teacher: (B, N, Dt) (Dt may differ from D).  Every sample's N×N cosine
    matrices are materialised (this is the obvious code the fused op avoids).  Rows are normalised
    by their norm clamped to 1e-8.  The mean is over B·N² pairs (NaN when B·N = 0, like
    ``torch.mean`` of an empty tensor).  The teacher is detached unless ``grad_target``.
    """
    if not grad_target:
        teacher = teacher.detach()
    student, teacher = up(student, upcast), up(teacher, upcast)
    s = student / student.norm(dim=-1, keepdim=True).clamp_min(EPS)
    t = teacher / teacher.norm(dim=-1, keepdim=True).clamp_min(EPS)
    cs = s @ s.transpose(-1, -2)  # (B, N, N)
    ct = t @ t.transpose(-1, -2)
    return result(torch.relu((cs - ct).abs() - margin)).mean()
