"""Time grid, guidance and the ODE/SDE solvers of method §4.

``sample(model, noise, y, steps)`` integrates ``dx/dt = v(x, t, y)`` from ``t = 0`` (``noise``) to
``t = 1`` (data) over ``steps`` updates on the shifted grid of ``steps + 1`` points (the paper's
"150 sampling steps" are ``steps=149``).  Methods:

* ``"euler"``: ``x_{i+1} = x_i + (t_{i+1} - t_i)·v(x_i, t_i)`` — exactly the official sampler;
* ``"heun"``: Heun's second-order method (2 evaluations per update);
* ``"euler_maruyama"`` (alias ``"sde"``): the reverse SDE with the same marginals,
  ``dx = [v + ½·w(t)·∇log p_t(x)] dt + sqrt(w(t)) dW`` with ``w(t) = diffusion·(1 - t)`` and the score
  obtained from the velocity (``∇log p_t(x) = -(x - t·v)/(1 - t)`` for ``x_t = t·x1 + (1 - t)·x0``),
  so the drift is ``v - ½·diffusion·(x - t·v)``; the last update is deterministic (no noise added).

Guidance: ``"cfg"`` runs the conditional and the null-class inputs in one batch,
``v = v_u + w·(v_c - v_u)``; ``"autoguidance"`` uses a weaker ``guide_model``,
``v = v_g + w·(v - v_g)``.  Both only for steps whose ``t_i`` lies in ``interval`` (inclusive), the
plain conditional velocity elsewhere.  ``scale == 1`` skips the extra evaluation (it would not change
the result).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from rectok_fast._validate import check_same_device, check_tensor
from rectok_fast.schedules import time_grid  # the shifted grid of method §4 (re-exported here)
from rectok_fast.utils.modules import unwrap

__all__ = ["METHODS", "guided_velocity", "sample", "time_grid"]

METHODS = ("euler", "heun", "euler_maruyama", "sde")
GUIDANCES = (None, "none", "cfg", "autoguidance")


def _null_labels(model: nn.Module, y: torch.Tensor) -> torch.Tensor:
    num_classes = getattr(unwrap(model), "num_classes", None)
    if num_classes is None:
        raise ValueError("sample: guidance='cfg' needs a model with a `num_classes` attribute (null class index)")
    return torch.full_like(y, num_classes)


def guided_velocity(
    model: Callable,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    *,
    guidance: str | None = None,
    scale: float = 1.0,
    guide_model: Callable | None = None,
) -> torch.Tensor:
    """The (guided) velocity at (x (B, C, g, g), t (B,), y (B,)) → (B, C, g, g).

    ``guidance=None``: ``v(x, t, y)``; ``"cfg"``: ``v_u + scale·(v_c - v_u)`` with the null class
    batched alongside; ``"autoguidance"``: ``v_g + scale·(v - v_g)`` with ``v_g`` from ``guide_model``.
    """
    if guidance in (None, "none") or scale == 1.0:
        return model(x, t, y)
    if guidance == "cfg":
        B = x.shape[0]
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, _null_labels(model, y)]))
        v_c, v_u = v[:B], v[B:]
        return v_u + scale * (v_c - v_u)
    if guidance == "autoguidance":
        if guide_model is None:
            raise ValueError("sample: guidance='autoguidance' needs `guide_model`")
        v = model(x, t, y)
        v_g = guide_model(x, t, y)
        return v_g + scale * (v - v_g)
    raise ValueError(f"sample: `guidance` must be one of {GUIDANCES}, got {guidance!r}")


_COMPILED: dict = {}


def _compiled_velocity(spec, device: torch.device):
    """``guided_velocity`` under ``torch.compile(fullgraph=True)``; compiled once per spec (dynamo
    guards on the model objects, so other models reuse the cache entry and get their own graphs)."""
    if spec is True:
        spec = "reduce-overhead" if device.type == "cuda" else "default"
    kwargs = dict(spec) if isinstance(spec, dict) else {"mode": spec}
    kwargs.setdefault("fullgraph", True)
    kwargs.setdefault("dynamic", False)
    key = repr(sorted((k, repr(v)) for k, v in kwargs.items()))
    fn = _COMPILED.get(key)
    if fn is None or isinstance(spec, dict):  # user-provided backends (counters) get a fresh wrapper
        fn = torch.compile(guided_velocity, **kwargs)
        if not isinstance(spec, dict):
            _COMPILED[key] = fn
    cudagraphs = kwargs.get("mode") in ("reduce-overhead", "max-autotune")
    if not cudagraphs:
        return fn

    def call(*args, **kw):  # CUDA-graph outputs are overwritten by the next replay: copy them out
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args, **kw).clone()

    return call


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    *,
    method: str = "euler",
    shift: float | None = None,
    guidance: str | None = None,
    scale: float = 1.0,
    guide_model: nn.Module | None = None,
    interval: tuple[float, float] = (0.0, 1.0),
    diffusion: float = 1.0,
    generator: torch.Generator | None = None,
    compile: bool | str | dict = False,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Integrate from ``noise`` (t = 0) to data (t = 1); returns latents like ``noise``, (B, C, g, g).

    Args:
        model: ``model(x, t, y)`` → velocity, e.g. :class:`rectok_fast.models.DiTDH` (in eval mode).
        noise: (B, C, g, g) starting point ``x_0 ~ N(0, I)``.
        y: (B,) int class labels.
        steps: number of solver updates (the grid has ``steps + 1`` points).
        method: ``"euler"`` | ``"heun"`` | ``"euler_maruyama"`` (``"sde"``).
        shift: time-grid shift; None takes ``model.default_shift`` (1.0 when the model has none).
        guidance: None | ``"cfg"`` | ``"autoguidance"``; ``scale`` its weight ``w``; ``guide_model`` the
            weaker model for autoguidance; ``interval = (lo, hi)``: guide only where ``lo ≤ t_i ≤ hi``.
        diffusion: SDE noise level (``w(t) = diffusion·(1 - t)``); ``generator`` its RNG.
        compile: False, True (CUDA graphs via ``mode="reduce-overhead"`` on GPU, the default mode on
            CPU), a ``torch.compile`` mode string, or a dict of ``torch.compile`` kwargs; the velocity
            evaluation is compiled with ``fullgraph=True`` and times are tensors (no recompiles per step).
        return_trajectory: also return the list of the ``steps + 1`` states.
    """
    check_tensor("sample", "noise", noise, ndim=(3, 4, 5))
    check_tensor("sample", "y", y, ndim=1, dtypes=(torch.int64, torch.int32))
    check_same_device("sample", noise=noise, y=y)
    B = noise.shape[0]
    if y.shape[0] != B:
        raise ValueError(f"sample: `y` must have shape ({B},), got {tuple(y.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample: `steps` must be a positive int (number of updates), got {steps!r}")
    if method not in METHODS:
        raise ValueError(f"sample: `method` must be one of {METHODS}, got {method!r}")
    if guidance not in GUIDANCES:
        raise ValueError(f"sample: `guidance` must be one of {GUIDANCES}, got {guidance!r}")
    if guidance == "autoguidance" and guide_model is None:
        raise ValueError("sample: guidance='autoguidance' needs `guide_model`")
    lo, hi = interval
    if not lo <= hi:
        raise ValueError(f"sample: `interval` must be (lo, hi) with lo <= hi, got {interval}")
    if shift is None:
        shift = float(getattr(unwrap(model), "default_shift", 1.0))

    grid_host = time_grid(steps + 1, shift, dtype=torch.float64).tolist()
    grid = time_grid(steps + 1, shift, device=noise.device, dtype=torch.float32)
    vel = guided_velocity if not compile else _compiled_velocity(compile, noise.device)

    def v(x: torch.Tensor, i: int) -> torch.Tensor:
        t = grid[i].expand(B)
        guided = guidance not in (None, "none") and scale != 1.0 and lo <= grid_host[i] <= hi
        if not guided:
            return vel(model, x, t, y)
        return vel(model, x, t, y, guidance=guidance, scale=scale, guide_model=guide_model)

    x = noise
    traj = [x] if return_trajectory else None
    for i in range(steps):
        dt = grid[i + 1] - grid[i]
        if method == "euler":
            x = x + dt * v(x, i)
        elif method == "heun":
            v1 = v(x, i)
            x_pred = x + dt * v1
            x = x + dt * 0.5 * (v1 + v(x_pred, i + 1))
        else:  # Euler–Maruyama
            vi = v(x, i)
            drift = vi - 0.5 * diffusion * (x - grid[i] * vi)
            x = x + dt * drift
            if i < steps - 1 and diffusion > 0:
                std = torch.sqrt(diffusion * (1 - grid[i]) * dt)
                x = x + std * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if traj is not None:
            traj.append(x)
    return (x, traj) if return_trajectory else x
