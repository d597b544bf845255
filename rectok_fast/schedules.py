"""Flow times and resolution shifts: one formula each (method §2–§4).

The tokenizer and the generator use **opposite time conventions**; every function here says which
one it serves:

======================  =========================================  ==========================================
                        tokenizer (RecTok, method §2–3)              generator (DiT^DH, method §4)
======================  =========================================  ==========================================
``t = 0``               the clean latent ``z``                     pure noise ``x0 ~ N(0, I)``
``t = 1``               pure noise (``γ·ε``)                       the data ``x1``
interpolation           ``z_t = (1 − t)·z + t·γ·ε``                ``x_t = t·x1 + (1 − t)·x0``
training times          :func:`sample_time`:                       :func:`training_time`:
                        ``t = shift_time(u, s)``                   ``t = 1 − shift_time(u, s)`` (s > 1),
                        (or ``uniform`` / ``lognorm``)             ``t = u`` (s ≤ 1, no shift)
sampling times          —                                          :func:`time_grid` (0 → 1, Euler grid)
shift ``s``             :func:`default_shift` ``(g, C)``, i.e.     :func:`default_shift` ``(g, C)``, i.e.
                        ``RecTok.timestep_shift``                  ``DiTDH.default_shift``
======================  =========================================  ==========================================

In both, ``s = sqrt(g·g·C / 4096)`` for a ``g×g`` grid of ``C`` channels (√8 at 16×16×128) and the
shifted time is ``shift_time(u, s) = s·u / (1 + (s − 1)·u)``; with ``s > 1`` it pushes tokenizer times
towards the noise end and DiT training times (through ``1 − …``) towards the noise end as well.

Nothing here touches a GPU or syncs with the host; every sampler takes a ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch

from ._validate import check_real

__all__ = [
    "TOKENIZER_SCHEDULES",
    "default_shift",
    "sample_time",
    "shift_time",
    "time_grid",
    "training_time",
]

# the tokenizer's noise schedules (RecTokConfig.noise_schedule, nn.FlowNoiser(schedule=...))
TOKENIZER_SCHEDULES = ("shift", "lognorm", "uniform")


def check_shift(op: str, shift) -> float:
    """``shift`` as a float: a finite real number > 0 (``s·u / (1 + (s − 1)·u)`` leaves [0, 1] otherwise).
    Raises ``TypeError`` / ``ValueError`` naming ``op``."""
    shift = check_real(op, "shift", shift)
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"{op}: `shift` must be finite and > 0, got {shift}")
    return shift


def default_shift(grid: int, channels: int) -> float:
    """``s = sqrt(g·g·C / 4096)``: √8 for a 16×16 grid of 128 channels, √2 for 8×8×128 (both conventions).
    ``grid`` and ``channels`` must be positive integers."""
    for name, v in (("grid", grid), ("channels", channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"default_shift: `{name}` must be a positive integer, got {v!r}")
    return math.sqrt(grid * grid * channels / 4096)


def shift_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``s·u / (1 + (s − 1)·u)``: the resolution-dependent time shift (``s = 1`` is the identity).

    Elementwise on ``u`` (any shape, any float dtype); maps [0, 1] onto [0, 1] monotonically for a
    finite ``shift > 0`` (anything else raises).
    """
    shift = check_shift("shift_time", shift)
    return shift * u / (1 + (shift - 1) * u)


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
    """Tokenizer flow times (B,) fp32, **t = 1 is noise** (method §2).

    ``uniform``: ``U(0, 1)``; ``lognorm``: ``sigmoid(N(0, 1))``; ``shift``: ``shift_time(U(0, 1), s)``
    with ``s = shift`` or ``default_shift(grid, channels)``.  One draw of ``batch`` numbers from
    ``generator`` (torch's default generator when None).
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
        shift = check_shift("sample_time", shift)
        return shift_time(torch.rand(batch, device=device, generator=generator), shift)
    raise ValueError(f"sample_time: `schedule` must be one of {TOKENIZER_SCHEDULES}, got {schedule!r}")


def training_time(
    batch: int, shift: float, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DiT training times (B,) fp32, **t = 1 is data** (method §4), from one draw ``u ~ U(0, 1)``.

    ``t = 1 − shift_time(u, s)`` when ``s > 1`` (dense near the noise end ``t = 0``); when ``s ≤ 1``
    there is no shift and ``t = u``.
    """
    shift = check_shift("training_time", shift)
    u = torch.rand(batch, device=device, generator=generator)
    if shift <= 1.0:
        return u
    return 1 - shift_time(u, shift)


def time_grid(
    num_points: int, shift: float = 1.0, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The DiT sampling grid (num_points,), **t = 1 is data**, increasing from 0 (noise) to 1 (method §4).

    ``τ_i = i/(n−1)``, ``m_i = shift_time(τ_i, s)`` (in fp64); for ``s ≥ 1`` the grid is
    ``t_i = m_{n−1} − m_{n−1−i}`` (dense near the noise end), for ``s < 1`` it is ``m_i``; ``s = 1``
    gives the uniform grid.
    """
    if num_points < 2:
        raise ValueError(f"time_grid: `num_points` must be >= 2, got {num_points}")
    if not shift > 0:
        raise ValueError(f"time_grid: `shift` must be positive, got {shift}")
    tau = torch.linspace(0, 1, num_points, dtype=torch.float64)
    m = shift_time(tau, shift)
    t = m if shift < 1 else m[-1] - m.flip(0)
    return t.to(device=device, dtype=dtype)
