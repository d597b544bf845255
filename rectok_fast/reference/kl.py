"""References of the two KL losses: the Gaussian posterior KL to N(0, I) and the softmax KL feature alignment."""

from __future__ import annotations

import torch

from ._upcast import up
from .posterior_flow import LOGVAR_MAX, LOGVAR_MIN, clamp_inclusive


def gaussian_kl(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    *,
    logvar_clamp: tuple[float, float] | None = (LOGVAR_MIN, LOGVAR_MAX),
    upcast: bool = True,
) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch dim: (B,) fp32 (fp64 for fp64 inputs).

    ``0.5·Σ(mean² + var - 1 - logvar)`` with logvar clamped to [-30, 20] first (as the official
    DiagonalGaussian does; ``logvar_clamp=None`` disables it).  The clamp's gradient passes where
    ``lo <= logvar <= hi`` (:func:`clamp_inclusive`).
    """
    mean, logvar = up(mean, upcast), up(logvar, upcast)
    if logvar_clamp is not None:
        logvar = clamp_inclusive(logvar, *logvar_clamp)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def kl_align_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    *,
    grad_target: bool = False,
    upcast: bool = True,
) -> torch.Tensor:
    """Distribution-level feature alignment: mean over (selected) tokens of
    ``T²·KL(softmax(teacher/T) || softmax(student/T))`` over the last (feature) dim, 0-dim fp32
    (fp64 when both inputs are fp64).

    student, teacher: (..., D); mask as in :func:`cosine_align_loss`.  The ``T²`` factor keeps the
    gradient scale independent of the temperature (Hinton et al.).
    """
    if not grad_target:
        teacher = teacher.detach()
    s = up(student, upcast) / temperature
    tch = up(teacher, upcast) / temperature
    log_ps = torch.log_softmax(s, dim=-1)
    log_pt = torch.log_softmax(tch, dim=-1)
    per_token = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temperature**2
    if mask is None:
        return per_token.mean()
    w = mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)
