"""rectok_fast.schedules: one formula per flow time and shift, both time conventions, and the old
names that moved there (aliases that warn)."""

from __future__ import annotations

import ast
import math
import pathlib

import pytest
import torch

import rectok_fast
from rectok_fast import schedules
from rectok_fast.schedules import default_shift, sample_time, shift_time, time_grid, training_time

PKG = pathlib.Path(rectok_fast.__file__).parent


def test_default_shift_values():
    assert default_shift(16, 128) == pytest.approx(math.sqrt(8))
    assert default_shift(8, 128) == pytest.approx(math.sqrt(2))
    assert default_shift(8, 64) == 1.0
    assert default_shift(4, 32) == pytest.approx(math.sqrt(1 / 8))


def test_shift_time_formula():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, math.sqrt(8)):
        got = shift_time(u, s)
        torch.testing.assert_close(got, s * u / (1 + (s - 1) * u), rtol=0, atol=0)
        assert got[0] == 0 and got[-1] == 1 and bool((got.diff() > 0).all())
    torch.testing.assert_close(shift_time(u, 1.0), u, rtol=0, atol=1e-15)
    assert bool((shift_time(u[1:-1], 3.0) > u[1:-1]).all())  # s > 1 pushes tokenizer times towards the noise (t = 1)


def test_sample_time_schedules_and_generator():
    """Tokenizer convention (t = 1 noise): one draw from the generator per schedule."""
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    u = torch.rand(64, generator=g())
    torch.testing.assert_close(sample_time(64, "uniform", generator=g()), u, rtol=0, atol=0)
    torch.testing.assert_close(sample_time(64, "shift", shift=3.0, generator=g()), shift_time(u, 3.0), rtol=0, atol=0)
    torch.testing.assert_close(
        sample_time(64, "shift", grid=16, channels=128, generator=g()), shift_time(u, math.sqrt(8)), rtol=0, atol=0
    )
    n = torch.randn(64, generator=g())
    torch.testing.assert_close(sample_time(64, "lognorm", generator=g()), torch.sigmoid(n), rtol=0, atol=0)
    t = sample_time(4, "shift", shift=2.0)
    assert t.dtype == torch.float32 and t.shape == (4,)
    with pytest.raises(ValueError, match="grid"):
        sample_time(4, "shift")
    with pytest.raises(ValueError, match="schedule"):
        sample_time(4, "cosine")


@pytest.mark.parametrize("s", [0.25, math.sqrt(1 / 8), 1.0])
def test_training_time_no_shift_is_u(s):
    """DiT convention (t = 1 data): for s <= 1 there is no shift and t = u itself (method §4)."""
    u = torch.rand(257, generator=torch.Generator().manual_seed(1))
    t = training_time(257, s, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, u)


@pytest.mark.parametrize("s", [1.5, math.sqrt(8)])
def test_training_time_shifted(s):
    u = torch.rand(257, generator=torch.Generator().manual_seed(2))
    t = training_time(257, s, generator=torch.Generator().manual_seed(2))
    assert torch.equal(t, 1 - s * u / (1 + (s - 1) * u))
    big = training_time(20000, s, generator=torch.Generator().manual_seed(3))
    assert big.median().item() == pytest.approx(1 - shift_time(torch.tensor(0.5), s).item(), abs=0.02)
    assert big.mean().item() < 0.5  # dense near the noise end t = 0


@pytest.mark.parametrize("n,s", [(2, 1.0), (9, 1.0), (9, 0.5), (150, math.sqrt(8)), (51, 2.0)])
def test_time_grid_is_shift_time_of_the_uniform_grid(n, s):
    tau = torch.linspace(0, 1, n, dtype=torch.float64)
    m = shift_time(tau, s)
    want = m if s < 1 else m[-1] - m.flip(0)
    got = time_grid(n, s, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[0] == 0 and got[-1] == 1
    if s == 1.0:
        torch.testing.assert_close(got, tau, rtol=0, atol=1e-15)


def test_model_shift_properties_use_default_shift():
    from rectok_fast.models import DiTDH
    from rectok_fast.models.rectok import RecTok, RecTokConfig

    tok = RecTok(RecTokConfig(img_size=32, patch_size=8, token_channels=32, encoder="tiny", decoder="tiny", teachers={}))
    assert tok.timestep_shift == default_shift(4, 32)
    dit = DiTDH(in_channels=8, input_size=4, hidden_size=(32, 32), depth=(1, 1), num_heads=(2, 2), num_classes=3)
    assert dit.default_shift == default_shift(4, 8)


def test_moved_names_alias_and_warn():
    import importlib

    from rectok_fast import ops, reference
    from rectok_fast.models import ditdh

    # the submodules (the packages' attribute of that name is the function)
    ops_pf = importlib.import_module("rectok_fast.ops.posterior_flow")
    ref_pf = importlib.import_module("rectok_fast.reference.posterior_flow")

    for module, names in (
        (ops, ("sample_time", "shift_time", "default_shift")),
        (ops_pf, ("sample_time", "shift_time", "default_shift")),
        (ref_pf, ("sample_time", "shift_time", "default_shift")),
        (reference, ("sample_time",)),
    ):
        for name in names:
            with pytest.warns(DeprecationWarning, match=f"rectok_fast.schedules.{name}"):
                assert getattr(module, name) is getattr(schedules, name)
    with pytest.raises(AttributeError):
        ops.no_such_name  # noqa: B018
    # re-exports that stay first-class (no warning): the sampler's grid, the DiT objective's times
    import rectok_fast.sampling as sampling

    assert sampling.time_grid is schedules.time_grid and ditdh.training_time is schedules.training_time


def _imports(path: pathlib.Path) -> set[str]:
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mods.add("." * node.level + (node.module or ""))
            mods.update("." * node.level + (node.module + "." if node.module else "") + a.name for a in node.names)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    return mods


@pytest.mark.parametrize("layer", ["train", "eval", "sampling", "models", "nn", "data", "utils"])
def test_pipelines_and_models_never_import_reference(layer):
    """The reference holds oracles for the ops; everything above the ops gets times from schedules."""
    for path in sorted((PKG / layer).rglob("*.py")):
        bad = [m for m in _imports(path) if m.split(".")[-1] == "reference" or ".reference." in m + "."]
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"
