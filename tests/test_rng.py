"""The in-kernel Philox normal stream behind posterior_flow and flow_matching.

Sample sizes are ~1.3e5 per stream: one launch of a few large programs (BLOCK = 16384 under the
interpreter).  Thresholds are 5 standard errors (or p > 1e-3), so a correct stream fails with
probability < 1e-5 per assertion while a broken one (reused words, wrong offsets) fails surely.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import triton
import triton.language as tl
from rectok_fast.kernels.posterior_flow import philox_normal2

from rectok_fast.ops.flow_matching import flow_matching_noise, flow_matching_xt
from rectok_fast.ops.posterior_flow import flow_noise, posterior_flow

stats = pytest.importorskip("scipy.stats", reason="scipy is needed for the normality tests")

SHAPE = (2, 256, 256)  # 131072 samples per stream
N_SAMPLES = 2 * 256 * 256
TOL = 5 / math.sqrt(N_SAMPLES)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def streams():
    dev = "cuda" if torch.cuda.is_available() and not _interpret() else "cpu"
    e1, e2 = flow_noise(2024, SHAPE, dev)
    f1, f2 = flow_noise(2025, SHAPE, dev)
    return dev, e1.cpu(), e2.cpu(), f1.cpu(), f2.cpu()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def test_same_seed_same_noise(streams):
    dev, e1, e2, _, _ = streams
    a1, a2 = flow_noise(2024, SHAPE, dev)
    assert torch.equal(a1.cpu(), e1) and torch.equal(a2.cpu(), e2)
    b1, b2 = flow_noise(torch.tensor([2024], device=dev), SHAPE)  # tensor seed: same stream
    assert torch.equal(b1.cpu(), e1) and torch.equal(b2.cpu(), e2)


def test_stream_depends_only_on_element_index(streams):
    """eps1[e] is the same whatever (B, N, C) the flat prefix of length e belongs to."""
    dev, e1, _, _, _ = streams
    small1, _ = flow_noise(2024, (1, 8, 4), dev)
    assert torch.equal(small1.cpu().flatten(), e1.flatten()[:32])


@pytest.mark.parametrize("which", [0, 1])
def test_moments_and_normality(streams, which):
    x = streams[1 + which].double().flatten()
    assert abs(x.mean().item()) < TOL
    assert abs(x.std().item() - 1.0) < TOL
    assert abs(((x**3).mean()).item()) < TOL * math.sqrt(15)  # third moment, var(x³) = 15
    assert stats.kstest(x.numpy(), "norm").pvalue > 1e-3
    assert stats.normaltest(x.numpy()).pvalue > 1e-3


def test_eps1_eps2_independent(streams):
    _, e1, e2, _, _ = streams
    assert abs(_corr(e1, e2)) < TOL
    assert abs(_corr(e1**2, e2**2)) < TOL  # beyond linear correlation (shared Box-Muller radius would show here)
    assert abs(_corr(e1.abs(), e2.abs())) < TOL


def test_different_seeds_uncorrelated(streams):
    _, e1, e2, f1, f2 = streams
    assert not torch.equal(e1, f1)
    for a, b in ((e1, f1), (e2, f2), (e1, f2)):
        assert abs(_corr(a, b)) < TOL


def test_neighbouring_offsets_uncorrelated(streams):
    _, e1, e2, _, _ = streams
    x = e1.flatten()
    for lag in (1, 2, 256):
        assert abs(_corr(x[:-lag], x[lag:])) < TOL
    # first half vs second half of the flat stream (offset e vs e + n/2)
    h = x.numel() // 2
    assert abs(_corr(x[:h], x[h:])) < 1.5 * TOL
    assert abs(_corr(e2.flatten()[:-1], e1.flatten()[1:])) < TOL


def test_seed_high_bits_matter(streams):
    dev = streams[0]
    lo, _ = flow_noise(7, (1, 64, 64), dev)
    hi, _ = flow_noise(7 + 2**32, (1, 64, 64), dev)
    neg, _ = flow_noise(-7, (1, 64, 64), dev)
    assert abs(_corr(lo, hi)) < 5 / 64 and abs(_corr(lo, neg)) < 5 / 64


@triton.jit
def _stream_at(SEED, OUT_A, OUT_B, OUT_R, OUT_R4, base, BLOCK: tl.constexpr):
    # OUT_*: (BLOCK,) fp32; elements base + [0, BLOCK) of the stream, and tl.randn / tl.randn4x at [0, BLOCK)
    i = tl.arange(0, BLOCK)
    seed = tl.load(SEED)
    a, b = philox_normal2(seed, base + i.to(tl.int64))
    tl.store(OUT_A + i, a)
    tl.store(OUT_B + i, b)
    tl.store(OUT_R + i, tl.randn(seed, i))
    _, _, r3, _ = tl.randn4x(seed, i)
    tl.store(OUT_R4 + i, r3)


def _stream(base: int, block: int = 4096, dev: str = "cpu"):
    seed = torch.tensor([31], device=dev)
    outs = [torch.empty(block, device=dev) for _ in range(4)]
    _stream_at[(1,)](seed, *outs, base, BLOCK=block)
    return [o.cpu() for o in outs]


def test_stream_is_tl_randn_and_int64_offsets():
    dev = "cuda" if torch.cuda.is_available() and not _interpret() else "cpu"
    a0, b0, r, r4 = _stream(0, dev=dev)
    # documented identities for e < 2**31
    assert torch.equal(a0, r)
    assert torch.equal(b0, r4)
    assert torch.equal(flow_noise(31, (1, 1, 4096), dev)[0].cpu().flatten(), a0)
    # offsets past 2**32 use the high counter word: a different, still normal, stream
    a1, b1, _, _ = _stream(2**32, dev=dev)
    a2, _, _, _ = _stream(2**33 + 5, dev=dev)
    tol = 5 / math.sqrt(4096)
    assert abs(_corr(a0, a1)) < tol and abs(_corr(a1, a2)) < tol and abs(_corr(a1, b1)) < tol
    assert abs(a1.mean().item()) < tol and abs(a1.std().item() - 1) < tol


def test_posterior_flow_noise_is_the_stream(kernel_device):
    """posterior_flow(seed) with mean = 0, logvar = 0, t = 1, γ = 1 outputs exactly (ε₁, ε₂)."""
    B, N, C = 2, 16, 8
    moments = torch.zeros(B, N, 2 * C, device=kernel_device)
    t = torch.ones(B, device=kernel_device)
    z, z_t, _ = posterior_flow(moments, t, 1.0, seed=2024, backend="triton")
    e1, e2 = flow_noise(2024, (B, N, C), kernel_device)
    torch.testing.assert_close(z, e1, rtol=0, atol=0)
    torch.testing.assert_close(z_t, e2, rtol=0, atol=0)


def test_flow_matching_noise_is_eps1_stream_and_normal(kernel_device):
    shape = (2, 256, 256)
    x0 = flow_matching_noise(2024, shape, kernel_device).cpu()
    e1, _ = flow_noise(2024, (2, 256, 256), kernel_device)
    assert torch.equal(x0, e1.cpu())  # documented: x0 uses the eps_a words, like eps1
    zeros = torch.zeros(2, 3, 5, device=kernel_device)
    xt = flow_matching_xt(zeros, torch.zeros(2, device=kernel_device), seed=2024, backend="triton")  # t = 0: x0
    assert torch.equal(xt.cpu().flatten(), x0.flatten()[:30])
