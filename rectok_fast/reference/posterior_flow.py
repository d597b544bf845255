"""Reference of the posterior sample + forward-flow interpolation + KL of method §2 (the oracle only:
the flow-time schedules are in :mod:`rectok_fast.schedules`)."""

from __future__ import annotations

import torch

from .._moved import moved_names
from ._upcast import up

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def clamp_inclusive(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``x.clamp(lo, hi)`` whose gradient passes where ``lo <= x <= hi`` (bounds *included*).

    The project's convention, stated with an explicit mask so it does not depend on the installed
    torch (torch <= 2.13 passes the gradient at the bound, 2.14 gives 0 there).  NaN propagates in
    the value and gets no gradient.
    """
    keep = (x >= lo) & (x <= hi)
    return torch.where(keep, x, x.clamp(lo, hi).detach())


def clamp_logvar(logvar: torch.Tensor) -> torch.Tensor:
    """``logvar`` clamped to [LOGVAR_MIN, LOGVAR_MAX] = [-30, 20], gradient passing inclusively."""
    return clamp_inclusive(logvar, LOGVAR_MIN, LOGVAR_MAX)


def posterior_flow(
    moments: torch.Tensor,
    t: torch.Tensor,
    gamma: float = 1.0,
    *,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    sample_posterior: bool = True,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior sample, flow interpolation and KL of method §2, the obvious way.

    moments: (B, N, 2C) encoder output, ``mean = moments[..., :C]``, ``logvar = moments[..., C:]``
    clamped to [-30, 20] (:func:`clamp_logvar`: the gradient passes where -30 <= logvar <= 20,
    bounds included); t: (B,) one time per sample (t = 1 is pure noise);
    noise: ``(eps_post, eps_flow)`` each (B, N, C), drawn with ``generator`` when None.
    Returns ``z = mean + std·eps_post`` (``mean`` when ``sample_posterior`` is False),
    ``z_t = (1 - t)·z + t·gamma·eps_flow`` (both (B, N, C), dtype of ``moments``) and the per-sample
    ``kl = 0.5·Σ_{N,C}(mean² + var - 1 - logvar)`` (B,) in fp32.
    """
    dtype = moments.dtype
    m = up(moments, upcast)
    C = m.shape[-1] // 2
    mean, logvar = m[..., :C], clamp_logvar(m[..., C:])
    if noise is None:
        shape = mean.shape
        # pass ``generator`` only when given: randn(..., generator=None) rejects symbolic shapes under torch.compile
        gen = {} if generator is None else {"generator": generator}
        eps_post = torch.randn(shape, device=m.device, dtype=m.dtype, **gen)
        eps_flow = torch.randn(shape, device=m.device, dtype=m.dtype, **gen)
    else:
        eps_post, eps_flow = (e.to(m.dtype) for e in noise)
    z = mean + torch.exp(0.5 * logvar) * eps_post if sample_posterior else mean
    tt = t.to(m.dtype).reshape(-1, *([1] * (z.dim() - 1)))
    z_t = (1 - tt) * z + tt * gamma * eps_flow
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1)
    return z.to(dtype), z_t.to(dtype), kl


# the flow-time helpers moved to rectok_fast.schedules (this module holds the oracle only)
__getattr__ = moved_names(
    __name__, dict.fromkeys(("default_shift", "sample_time", "shift_time"), "rectok_fast.schedules")
)
