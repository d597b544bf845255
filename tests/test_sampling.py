"""Sampling: method §4 time grid, golden Euler samples (plain, CFG, autoguidance), solver orders on an
analytic Gaussian flow, the Euler–Maruyama SDE's marginals, guidance intervals and argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from helpers import reference_file, rel_err

from rectok_fast.models.ditdh import DiTDH
from rectok_fast.sampling import guided_velocity, sample, time_grid

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def golden():
    return torch.load(reference_file("golden_ditdh_tiny.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def models(golden):
    return DiTDH.from_official(golden["state_dict"]), DiTDH.from_official(golden["ag_state_dict"])


class GaussianFlow(nn.Module):
    """Exact velocity for data ~ N(mu[y], s1²) per element and x_t = t·x1 + (1 - t)·x0.

    The probability-flow ODE maps x0 to ``mu + s1·x0`` exactly (x_t = t·mu + sqrt(var_t)·x0).
    """

    def __init__(self, mu: list[float], s1: float = 0.5):
        super().__init__()
        self.register_buffer("mu", torch.tensor(mu + [0.0]))  # last = null class
        self.num_classes = len(mu)
        self.s1 = s1
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        shape = (-1,) + (1,) * (x.dim() - 1)
        t, mu = t.to(x.dtype).view(shape), self.mu[y].view(shape)
        var = t**2 * self.s1**2 + (1 - t) ** 2
        return mu + (t * self.s1**2 - (1 - t)) / var * (x - t * mu)


# ----------------------------------------------------------------------------- time grid


def test_time_grid_golden(golden):
    grid = time_grid(golden["config"]["steps"], golden["outputs"]["shift"].item())
    torch.testing.assert_close(grid, golden["outputs"]["time_grid"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("n,s", [(2, 1.0), (9, math.sqrt(2)), (150, math.sqrt(8)), (17, 0.5), (50, 3.0)])
def test_time_grid_definition(n, s):
    g = time_grid(n, s, dtype=torch.float64)
    tau = torch.linspace(0, 1, n, dtype=torch.float64)
    m = s * tau / (1 + (s - 1) * tau)
    want = m if s < 1 else m[-1] - m.flip(0)
    torch.testing.assert_close(g, want)
    assert g[0] == 0 and g[-1] == 1 and torch.all(g.diff() > 0)
    if s > 1:  # dense near the noise end
        assert g.diff()[0] < g.diff()[-1]
    if s == 1.0:
        torch.testing.assert_close(g, tau)


def test_time_grid_rejects():
    with pytest.raises(ValueError, match="num_points"):
        time_grid(1)
    with pytest.raises(ValueError, match="shift"):
        time_grid(5, 0.0)


# ----------------------------------------------------------------------------- golden samples


def test_golden_cfg_velocity(golden, models):
    """The golden CFG velocity is evaluated at (sample_noise, t, y) with scale 1.7."""
    model, _ = models
    i, o = golden["inputs"], golden["outputs"]
    with torch.no_grad():
        v = guided_velocity(model, o["sample_noise"], i["t"], i["y"], guidance="cfg", scale=1.7)
    assert rel_err(v, o["cfg_velocity"]) <= 1e-5


@pytest.mark.parametrize(
    "key,kw",
    [
        ("sample_euler_nocfg", {}),
        ("sample_euler_cfg", {"guidance": "cfg", "scale": 1.7}),
        ("sample_euler_ag", {"guidance": "autoguidance", "scale": 1.4}),
    ],
)
def test_golden_samples(golden, models, key, kw):
    model, ag = models
    o, y = golden["outputs"], golden["inputs"]["y"]
    steps = golden["config"]["steps"] - 1  # 9 grid points = 8 updates
    if kw.get("guidance") == "autoguidance":
        kw = {**kw, "guide_model": ag}
    out = sample(model, o["sample_noise"], y, steps, **kw)  # shift=None: the model's default √2
    assert rel_err(out, o[key]) <= 1e-5
    explicit = sample(model, o["sample_noise"], y, steps, shift=math.sqrt(2), **kw)
    torch.testing.assert_close(explicit, out, rtol=0, atol=0)


# ----------------------------------------------------------------------------- solvers on an exact flow


def _final_err(method: str, steps: int, shift: float = 1.0) -> float:
    torch.manual_seed(0)
    model = GaussianFlow([0.7, -1.2])
    x0 = torch.randn(64, 2, 3, 3, dtype=torch.float64)  # fp64: measure the solver, not rounding
    y = torch.arange(64) % 2
    exact = model.mu[y].double().view(-1, 1, 1, 1) + model.s1 * x0
    out = sample(model, x0, y, steps, method=method, shift=shift)
    return (out - exact).abs().max().item()


def test_euler_first_order_heun_second_order():
    e = [_final_err("euler", n) for n in (8, 16, 32)]
    h = [_final_err("heun", n) for n in (16, 32, 64)]
    assert 1.8 < e[0] / e[1] < 2.2 and 1.8 < e[1] / e[2] < 2.2  # error ∝ 1/steps
    assert 3.4 < h[0] / h[1] < 4.6 and 3.6 < h[1] / h[2] < 4.4  # error ∝ 1/steps²
    assert h[0] < e[1] / 20
    assert e[2] < 0.08


def test_shift_changes_grid_but_converges():
    assert _final_err("euler", 64, shift=math.sqrt(8)) < 0.1
    assert _final_err("euler", 8, shift=math.sqrt(8)) != _final_err("euler", 8)


def test_heun_uses_two_evaluations_per_step():
    model = GaussianFlow([0.0])
    sample(model, torch.randn(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), 5, method="heun")
    assert model.calls == 10


def test_sde_preserves_marginals():
    """Euler–Maruyama from N(0, I) reaches N(mu, s1²) (the ODE's marginals), with fresh noise."""
    torch.manual_seed(0)
    model = GaussianFlow([0.7])
    x0 = torch.randn(20000, 1, 1, 1)
    y = torch.zeros(20000, dtype=torch.long)
    gen = torch.Generator().manual_seed(1)
    out = sample(model, x0, y, 200, method="euler_maruyama", diffusion=1.0, generator=gen)
    assert out.mean().item() == pytest.approx(0.7, abs=0.02)
    assert out.std().item() == pytest.approx(0.5, abs=0.02)
    # Stochastic: far from the deterministic ODE map of the same noise.
    ode = sample(model, x0, y, 200)
    assert (out - ode).abs().mean() > 0.1
    gen2 = torch.Generator().manual_seed(1)
    again = sample(model, x0, y, 200, method="sde", diffusion=1.0, generator=gen2)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_sde_without_diffusion_is_euler():
    model = GaussianFlow([0.3, 1.0])
    x0, y = torch.randn(4, 2, 2, 2), torch.tensor([0, 1, 0, 1])
    torch.testing.assert_close(
        sample(model, x0, y, 6, method="sde", diffusion=0.0), sample(model, x0, y, 6), rtol=1e-6, atol=1e-6
    )


# ----------------------------------------------------------------------------- guidance


def test_cfg_matches_manual_combination(models):
    model, _ = models
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 128, 8, 8), torch.rand(3), torch.tensor([0, 3, 9])
    with torch.no_grad():
        vc, vu = model(x, t, y), model(x, t, torch.full_like(y, 10))
        v = guided_velocity(model, x, t, y, guidance="cfg", scale=2.5)
    torch.testing.assert_close(v, vu + 2.5 * (vc - vu), rtol=1e-5, atol=1e-5)


def test_guidance_scale_one_and_self_guidance_are_unguided(golden, models):
    model, _ = models
    o, y = golden["outputs"], golden["inputs"]["y"]
    plain = sample(model, o["sample_noise"], y, 8)
    torch.testing.assert_close(sample(model, o["sample_noise"], y, 8, guidance="cfg", scale=1.0), plain)
    ag_self = sample(model, o["sample_noise"], y, 8, guidance="autoguidance", scale=1.4, guide_model=model)
    torch.testing.assert_close(ag_self, plain, rtol=1e-5, atol=1e-5)


def test_guidance_interval():
    """Outside the interval the plain conditional velocity is used; inside, the guided one."""
    model = GaussianFlow([1.0, -1.0])
    x0, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 0, 1])
    plain = sample(model, x0, y, 8)
    full = sample(model, x0, y, 8, guidance="cfg", scale=3.0)
    assert not torch.allclose(full, plain)
    empty = sample(model, x0, y, 8, guidance="cfg", scale=3.0, interval=(0.55, 0.6))  # no grid point in there
    torch.testing.assert_close(empty, plain)
    # Guiding only the last half of the trajectory: reproduce it by hand.
    grid = time_grid(9, 1.0)
    x = x0
    for i in range(8):
        t = grid[i].expand(4)
        g = 0.5 <= grid[i].item() <= 1.0
        v = guided_velocity(model, x, t, y, guidance="cfg" if g else None, scale=3.0)
        x = x + (grid[i + 1] - grid[i]) * v
    half = sample(model, x0, y, 8, guidance="cfg", scale=3.0, interval=(0.5, 1.0))
    torch.testing.assert_close(half, x)
    assert not torch.allclose(half, full) and not torch.allclose(half, plain)


def test_trajectory():
    model = GaussianFlow([0.0])
    x0, y = torch.randn(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    out, traj = sample(model, x0, y, 4, return_trajectory=True)
    assert len(traj) == 5 and traj[0] is x0 and torch.equal(traj[-1], out)


def test_argument_checks():
    model = GaussianFlow([0.0])
    x0, y = torch.randn(2, 1, 2, 2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="method"):
        sample(model, x0, y, 4, method="rk4")
    with pytest.raises(ValueError, match="guide_model"):
        sample(model, x0, y, 4, guidance="autoguidance", scale=2.0)
    with pytest.raises(ValueError, match="guidance"):
        sample(model, x0, y, 4, guidance="pag", scale=2.0)
    with pytest.raises(ValueError, match="steps"):
        sample(model, x0, y, 0)
    with pytest.raises(ValueError, match="`y`"):
        sample(model, x0, torch.zeros(3, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="`y`"):
        sample(model, x0, torch.zeros(2), 4)
    with pytest.raises(ValueError, match="interval"):
        sample(model, x0, y, 4, interval=(0.8, 0.2))
