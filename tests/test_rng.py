"""The in-kernel Gaussian noise stream (version 2, :mod:`rectok_fast.kernels.philox`).

Statistics use ~1e6 draws per stream.  Thresholds are 5 standard errors (or p > 1e-4), so a correct
stream fails an assertion with probability < 1e-5 while a broken one (reused words, correlated
lanes, a wrong transform, a missing tail) fails surely: e.g. a Box–Muller radius shared by two
normals shows up in the correlation of their squares, a 1e-3 error in the variance is 2.4 standard
errors here and is caught by the KS/Anderson tests long before it reaches that size.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from rectok_fast.kernels.philox import NOISE_STREAM_VERSION, box_muller, philox4x32

from rectok_fast.ops import flow_matching_noise, flow_matching_xt, flow_noise, posterior_flow
from rectok_fast.ops._noise import noise_stream_info, seed_args

stats = pytest.importorskip("scipy.stats", reason="scipy is needed for the normality tests")

SHAPE = (16, 256, 256)  # 1,048,576 draws per stream
N_SAMPLES = 16 * 256 * 256
TOL = 5 / math.sqrt(N_SAMPLES)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dev() -> str:
    return "cuda" if torch.cuda.is_available() and not _interpret() else "cpu"


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _tol(n: int) -> float:
    return 5 / math.sqrt(n)


@pytest.fixture(scope="module")
def streams():
    dev = _dev()
    e1, e2 = flow_noise(2024, SHAPE, dev)
    f1, f2 = flow_noise(2025, SHAPE, dev)
    x0 = flow_matching_noise(2024, SHAPE, dev)
    return dev, e1.cpu(), e2.cpu(), f1.cpu(), f2.cpu(), x0.cpu()


# ----------------------------------------------------------------------------- the generator


@triton.jit
def _philox_kat(C, K, OUT, ROUNDS: tl.constexpr):
    # C: (4,) uint32 counters as int64, K: (2,) key as int64, OUT: (4,) int64
    i = tl.arange(0, 1)
    c0 = tl.load(C + i).to(tl.uint32)
    c1 = tl.load(C + 1 + i).to(tl.uint32)
    c2 = tl.load(C + 2 + i).to(tl.uint32)
    c3 = tl.load(C + 3 + i).to(tl.uint32)
    k0 = tl.load(K).to(tl.uint32)
    k1 = tl.load(K + 1).to(tl.uint32)
    w0, w1, w2, w3 = philox4x32(c0, c1, c2, c3, k0, k1, ROUNDS)
    tl.store(OUT + i, w0.to(tl.int64))
    tl.store(OUT + 1 + i, w1.to(tl.int64))
    tl.store(OUT + 2 + i, w2.to(tl.int64))
    tl.store(OUT + 3 + i, w3.to(tl.int64))


def _philox(counter, key, rounds=10):
    dev = _dev()
    out = torch.zeros(4, dtype=torch.int64, device=dev)
    _philox_kat[(1,)](torch.tensor(counter, device=dev), torch.tensor(key, device=dev), out, ROUNDS=rounds)
    return [int(v) for v in out.cpu()]


def _philox_py(counter, key, rounds=10):
    """Philox-4x32 from its definition (Salmon et al. 2011), in Python integers."""
    c, k = list(counter), list(key)
    for _ in range(rounds):
        p0, p2 = c[0] * 0xD2511F53, c[2] * 0xCD9E8D57
        c = [(p2 >> 32) ^ c[1] ^ k[0], p2 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
        k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
    return c


def test_philox_known_answers():
    """Random123's published philox4x32_10 test vectors, and 7 rounds against the definition."""
    assert _philox([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi_c, pi_k = [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]
    assert _philox(pi_c, pi_k) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    assert _philox(pi_c, pi_k, 7) == _philox_py(pi_c, pi_k, 7) != _philox(pi_c, pi_k)


@triton.jit
def _bm_kernel(WR, WA, X, Y, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x, y = box_muller(tl.load(WR + i).to(tl.uint32), tl.load(WA + i).to(tl.uint32))
    tl.store(X + i, x)
    tl.store(Y + i, y)


def test_box_muller_accuracy_and_range():
    """The transform against float64 Box–Muller of the same (u, φ), over the whole word range."""
    g = torch.Generator().manual_seed(1)
    n = 1 << 16
    wr = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    wa = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    wr[:6] = torch.tensor([0, 1, 2, 2**31, 2**32 - 2, 2**32 - 1])  # extremes of the radius
    wa[:6] = torch.tensor([0, 1, 2**31, 2**32 - 1, 511, 512])  # extremes of the angle
    dev = _dev()
    x, y = torch.empty(n, device=dev), torch.empty(n, device=dev)
    _bm_kernel[(1,)](wr.to(dev), wa.to(dev), x, y, BLOCK=n)
    x, y = x.cpu().double(), y.cpu().double()
    u = (wr | 1).to(torch.float32).double() / 2**32
    h = (wa >> 9).double() * 2**-22 - 1.0
    sign = 1.0 - 2.0 * (wa & 1).double()
    r = torch.sqrt(-2 * torch.log(u))
    xr, yr = r * sign * torch.cos(h * math.pi / 2), r * torch.sin(h * math.pi / 2)
    assert torch.isfinite(x).all() and torch.isfinite(y).all()
    assert (x - xr).abs().max() < 1e-6 and (y - yr).abs().max() < 1e-6
    rr = torch.sqrt(x**2 + y**2)
    assert ((rr - r).abs() / r.clamp_min(1e-30)).max() < 1e-6  # relative accuracy of the radius, even near 0
    assert x.abs().max() <= math.sqrt(64 * math.log(2)) + 1e-5  # u >= 2**-32: |x| <= 6.66


# ----------------------------------------------------------------------------- determinism, layout


def test_same_seed_same_noise(streams):
    dev, e1, e2, _, _, _ = streams
    a1, a2 = flow_noise(2024, SHAPE, dev)
    assert torch.equal(a1.cpu(), e1) and torch.equal(a2.cpu(), e2)
    b1, b2 = flow_noise(torch.tensor([2024], device=dev), SHAPE)  # tensor seed: same stream
    assert torch.equal(b1.cpu(), e1) and torch.equal(b2.cpu(), e2)
    assert seed_args("op", 2024, torch.device(dev)) == (None, 2024)  # an int seed stays a Python int


def test_noise_is_keyed_by_sample_token_channel(streams):
    """eps[b, n, c] does not depend on the latent's N or C (or the tile sizes)."""
    dev, e1, e2, _, _, _ = streams
    small1, small2 = flow_noise(2024, (3, 7, 5), dev)
    assert torch.equal(small1.cpu(), e1[:3, :7, :5]) and torch.equal(small2.cpu(), e2[:3, :7, :5])


def test_flow_matching_noise_is_keyed_by_sample_and_group(streams):
    dev, _, _, _, _, x0 = streams
    # a shorter row is the prefix of a longer one (same per-sample groups), per sample
    short = flow_matching_noise(2024, (3, 1000), dev).cpu()
    assert torch.equal(short, x0.reshape(16, -1)[:3, :1000])


def test_stream_version_is_exposed():
    assert NOISE_STREAM_VERSION == 2
    assert noise_stream_info() == {"version": 2, "philox_rounds": 10}
    with pytest.raises(ValueError, match="philox_rounds"):
        noise_stream_info(5)


# ----------------------------------------------------------------------------- statistics


def _check_normal(x: torch.Tensor) -> None:
    x = x.double().flatten()
    n = x.numel()
    tol = _tol(n)
    assert abs(x.mean().item()) < tol
    assert abs(x.var().item() - 1.0) < tol * math.sqrt(2)  # var(x²) = 2
    assert abs((x**3).mean().item()) < tol * math.sqrt(15)  # var(x³) = 15
    assert abs((x**4).mean().item() - 3.0) < tol * math.sqrt(96)  # var(x⁴) = 105 − 9
    xn = x.numpy()
    assert stats.kstest(xn, "norm").pvalue > 1e-4
    assert stats.normaltest(xn).pvalue > 1e-4
    assert stats.cramervonmises(xn, "norm").pvalue > 1e-4  # quadratic EDF test (Anderson's family)
    # tails: counts beyond 3, 4 and 4.5 sigma against the normal's, Poisson 5-sigma band
    for k in (3.0, 4.0, 4.5):
        expect = n * math.erfc(k / math.sqrt(2))
        got = int((x.abs() > k).sum())
        assert abs(got - expect) < 5 * math.sqrt(expect) + 1, (k, got, expect)


@pytest.mark.parametrize("which", ["eps_post", "eps_flow", "x0"])
def test_moments_normality_and_tails(streams, which):
    x = {"eps_post": streams[1], "eps_flow": streams[2], "x0": streams[5]}[which]
    _check_normal(x)


def test_eps1_eps2_independent(streams):
    _, e1, e2, _, _, _ = streams
    assert abs(_corr(e1, e2)) < TOL
    assert abs(_corr(e1**2, e2**2)) < TOL
    assert abs(_corr(e1.abs(), e2.abs())) < TOL


def test_neighbouring_tokens_channels_samples_uncorrelated(streams):
    """Tokens 2p and 2p+1 share a Philox call (a Box–Muller pair: the same radius), channels and
    samples are neighbouring counters: no linear or squared correlation anywhere."""
    _, e1, e2, _, _, _ = streams
    for e in (e1, e2):
        pairs = (e[:, 0::2], e[:, 1::2])  # tokens 2p, 2p+1
        odd_even = (e[:, 1:-1:2], e[:, 2::2])  # tokens 2p+1, 2p+2 (different calls)
        chans = (e[:, :, :-1], e[:, :, 1:])
        samples = (e[:-1], e[1:])
        for a, b in (pairs, odd_even, chans, samples):
            tol = _tol(a.numel())
            assert abs(_corr(a, b)) < tol
            assert abs(_corr(a**2, b**2)) < tol
    h = e1.shape[0] // 2
    assert abs(_corr(e1[:h], e1[h:])) < _tol(e1[:h].numel())


def test_flow_matching_lanes_uncorrelated(streams):
    """x0 elements m, m+W, m+2W, m+3W come from one Philox call: uncorrelated, also in squares."""
    _, _, _, _, _, x0 = streams
    from rectok_fast.kernels.philox import FM_LANE as W

    x = x0.reshape(16, -1, 4, W)  # (sample, chunk, lane, r)
    for i in range(4):
        for j in range(i + 1, 4):
            a, b = x[:, :, i], x[:, :, j]
            assert abs(_corr(a, b)) < _tol(a.numel())
            assert abs(_corr(a**2, b**2)) < _tol(a.numel())
    flat = x0.reshape(16, -1)
    assert abs(_corr(flat[:, :-1], flat[:, 1:])) < _tol(flat.numel())
    assert abs(_corr(flat[:-1], flat[1:])) < _tol(flat[1:].numel())


def test_different_seeds_and_families_uncorrelated(streams):
    _, e1, e2, f1, f2, x0 = streams
    assert not torch.equal(e1, f1)
    for a, b in ((e1, f1), (e2, f2), (e1, f2), (e1, x0), (e2, x0)):  # x0: same seed, other counter family
        assert abs(_corr(a, b)) < TOL


def test_seed_high_bits_matter():
    dev = _dev()
    lo, _ = flow_noise(7, (1, 64, 64), dev)
    hi, _ = flow_noise(7 + 2**32, (1, 64, 64), dev)
    neg, _ = flow_noise(-7, (1, 64, 64), dev)
    wrap, _ = flow_noise(2**64 - 7, (1, 64, 64), dev)  # the same 64-bit key as -7
    assert abs(_corr(lo, hi)) < 5 / 64 and abs(_corr(lo, neg)) < 5 / 64
    assert torch.equal(neg, wrap)


def test_int64_sample_offsets():
    """Global sample indices past 2**32 use the high counter word: a different, still normal, stream."""
    dev = _dev()
    a, _ = flow_noise(31, (2, 64, 64), dev, sample_offset=2**32)
    b, _ = flow_noise(31, (2, 64, 64), dev)
    c, _ = flow_noise(31, (2, 64, 64), dev, sample_offset=2**40 + 3)
    assert abs(_corr(a, b)) < _tol(a.numel()) and abs(_corr(a, c)) < _tol(a.numel())
    assert abs(a.mean().item()) < _tol(a.numel()) and abs(a.std().item() - 1) < 2 * _tol(a.numel())


def test_seven_rounds_is_another_normal_stream():
    dev = _dev()
    a, _ = flow_noise(5, (4, 256, 256), dev, philox_rounds=7)
    b, _ = flow_noise(5, (4, 256, 256), dev)
    assert abs(_corr(a, b)) < _tol(a.numel())
    _check_normal(a)
    with pytest.raises(ValueError, match="philox_rounds"):
        flow_noise(5, (1, 2, 2), dev, philox_rounds=8)


# ----------------------------------------------------------------------------- the ops use the stream


def test_posterior_flow_noise_is_the_stream(kernel_device):
    """posterior_flow(seed) with mean = 0, logvar = 0, t = 1, γ = 1 outputs exactly (ε₁, ε₂)."""
    B, N, C = 2, 17, 8
    moments = torch.zeros(B, N, 2 * C, device=kernel_device)
    t = torch.ones(B, device=kernel_device)
    z, z_t, _ = posterior_flow(moments, t, 1.0, seed=2024, backend="triton")
    e1, e2 = flow_noise(2024, (B, N, C), kernel_device)
    torch.testing.assert_close(z, e1, rtol=0, atol=0)
    torch.testing.assert_close(z_t, e2, rtol=0, atol=0)
    for rounds in (7, 10):
        _, z_t7, _ = posterior_flow(moments, t, 1.0, seed=3, philox_rounds=rounds, backend="triton")
        assert torch.equal(z_t7, flow_noise(3, (B, N, C), kernel_device, philox_rounds=rounds)[1])


def test_flow_matching_xt_noise_is_the_stream(kernel_device):
    x0 = flow_matching_noise(2024, (2, 3, 700), kernel_device)
    zeros = torch.zeros(2, 3, 700, device=kernel_device)
    xt = flow_matching_xt(zeros, torch.zeros(2, device=kernel_device), seed=2024, backend="triton")  # t = 0: x0
    assert torch.equal(xt, x0)
    assert np.isfinite(x0.cpu().numpy()).all()
