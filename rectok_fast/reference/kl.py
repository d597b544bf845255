from __future__ import annotations

import torch

from .posterior_flow import LOGVAR_MAX, LOGVAR_MIN, clamp_inclusive


def _up(x: torch.Tensor) -> torch.Tensor:
    """fp32 for fp16/bf16/fp32; fp64 stays fp64 (so gradcheck in fp64 is meaningful)."""
    return x if x.dtype == torch.float64 else x.float()


def gaussian_kl(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    *,
    logvar_clamp: tuple[float, float] | None = (LOGVAR_MIN, LOGVAR_MAX),
) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch dim: (B,) fp32 (fp64 for fp64 inputs).

    ``0.5·Σ(mean² + var - 1 - logvar)`` with logvar clamped to [-30, 20] first (as the official
    DiagonalGaussian does; ``logvar_clamp=None`` disables it).  The clamp's gradient passes where
    ``lo <= logvar <= hi`` (:func:`clamp_inclusive`).
    """
    mean, logvar = _up(mean), _up(logvar)
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
) -> torch.Tensor:
    """Distribution-level feature alignment: mean over (selected) tokens of
    ``T²·KL(softmax(teacher/T) || softmax(student/T))`` over the last (feature) dim, 0-dim fp32
    (fp64 when both inputs are fp64).

    student, teacher: (..., D); mask as in :func:`cosine_align_loss`.  The ``T²`` factor keeps the
    gradient scale independent of the temperature (Hinton et al.).
    """
    if not grad_target:
        teacher = teacher.detach()
    s = _up(student) / temperature
    tch = _up(teacher) / temperature
    log_ps = torch.log_softmax(s, dim=-1)
    log_pt = torch.log_softmax(tch, dim=-1)
    per_token = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temperature**2
    if mask is None:
        return per_token.mean()
    w = mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)
