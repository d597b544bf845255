from __future__ import annotations

import math

import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


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
    """Posterior sample, flow interpolation and KL of SPEC §2, the obvious way.

    moments: (B, N, 2C) encoder output, ``mean = moments[..., :C]``, ``logvar = moments[..., C:]``
    clamped to [-30, 20]; t: (B,) one time per sample (t = 1 is pure noise);
    noise: ``(eps_post, eps_flow)`` each (B, N, C), drawn with ``generator`` when None.
    Returns ``z = mean + std·eps_post`` (``mean`` when ``sample_posterior`` is False),
    ``z_t = (1 - t)·z + t·gamma·eps_flow`` (both (B, N, C), dtype of ``moments``) and the per-sample
    ``kl = 0.5·Σ_{N,C}(mean² + var - 1 - logvar)`` (B,) in fp32.
    """
    dtype = moments.dtype
    m = moments.float() if upcast and dtype != torch.float64 else moments
    C = m.shape[-1] // 2
    mean, logvar = m[..., :C], m[..., C:].clamp(LOGVAR_MIN, LOGVAR_MAX)
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


def shift_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``s·u / (1 + (s - 1)·u)``: the resolution-dependent time shift (s = 1 is the identity)."""
    return shift * u / (1 + (shift - 1) * u)


def default_shift(grid: int, channels: int) -> float:
    """``s = sqrt(g·g·C / 4096)``: √8 for a 16×16 grid of 128 channels."""
    return math.sqrt(grid * grid * channels / 4096)


def sample_time(
    batch: int,
    schedule: str = "shift",
    *,
    shift: float | None = None,
    grid: int | None = None,
    channels: int | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One flow time per sample (B,), fp32, for the tokenizer's noise schedules (t = 1 is noise).

    ``uniform``: U(0, 1); ``lognorm``: sigmoid(N(0, 1)); ``shift``: ``shift_time(U(0,1), s)`` with
    ``s = shift`` or ``sqrt(grid²·channels/4096)``.
    """
    if schedule == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    if schedule == "lognorm":
        return torch.sigmoid(torch.randn(batch, device=device, generator=generator))
    if schedule == "shift":
        if shift is None:
            if grid is None or channels is None:
                raise ValueError("sample_time: schedule='shift' needs `shift` or both `grid` and `channels`")
            shift = default_shift(grid, channels)
        return shift_time(torch.rand(batch, device=device, generator=generator), shift)
    raise ValueError(f"sample_time: `schedule` must be 'uniform', 'lognorm' or 'shift', got {schedule!r}")
