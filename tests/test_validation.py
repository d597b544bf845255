"""One validation rule on every backend: seeds, gamma and shifts are checked the same way on the
reference path (the default on CPU) as on the fused path, and bad values raise naming the argument."""

from __future__ import annotations

import math

import pytest
import torch

from rectok_fast import ops, schedules

BACKENDS = ["reference", "triton"]
BAD_SEEDS = [1.5, True, 2**64, -(2**63) - 1, "1", torch.tensor(1.0), torch.tensor([1, 2])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", BAD_SEEDS, ids=repr)
def test_bad_seed_raises_on_every_backend(backend, seed):
    m, t, x1 = torch.randn(2, 4, 8), torch.rand(2), torch.randn(2, 3, 4)
    with pytest.raises((TypeError, ValueError), match="seed"):
        ops.posterior_flow(m, t, 1.0, seed=seed, backend=backend)
    with pytest.raises((TypeError, ValueError), match="seed"):
        ops.flow_matching_xt(x1, t, seed=seed, backend=backend)
    with pytest.raises((TypeError, ValueError), match="seed"):
        ops.flow_matching_loss(torch.randn_like(x1), x1, t, seed=seed, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_good_seeds_accepted_on_every_backend(backend):
    m, t = torch.randn(2, 4, 8), torch.rand(2)
    for seed in (0, -1, 2**63 - 1, 2**64 - 1, torch.tensor(5), torch.tensor([7], dtype=torch.int32)):
        ops.posterior_flow(m, t, 1.0, seed=seed, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", ["1.0", None, True, torch.tensor(1.0)], ids=repr)
def test_gamma_must_be_a_real_number_on_every_backend(backend, gamma):
    with pytest.raises(TypeError, match="gamma"):
        ops.posterior_flow(torch.randn(2, 4, 8), torch.rand(2), gamma, seed=1, backend=backend)


@pytest.mark.parametrize("shift", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_sample_time_rejects_shifts_outside_the_schedule(shift):
    with pytest.raises(ValueError, match="shift"):
        schedules.sample_time(4, "shift", shift=shift)
    with pytest.raises(ValueError, match="shift"):
        schedules.shift_time(torch.rand(4), shift)
    with pytest.raises(ValueError, match="shift"):
        schedules.training_time(4, shift)


@pytest.mark.parametrize(("grid", "channels"), [(0, 4), (4, 0), (-2, 4), (2.5, 4)])
def test_default_shift_rejects_empty_grids(grid, channels):
    with pytest.raises(ValueError, match="grid|channels"):
        schedules.sample_time(4, "shift", grid=grid, channels=channels)


def test_valid_shift_stays_in_unit_interval():
    for s in (0.25, 1.0, 8**0.5, 100.0):
        t = schedules.sample_time(10_000, "shift", shift=s, generator=torch.Generator().manual_seed(0))
        assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
