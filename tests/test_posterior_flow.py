"""posterior_flow (Triton, in-kernel Philox noise) against the PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import REFERENCE_DIR, assert_fa_rule

import rectok_fast
from rectok_fast.ops.posterior_flow import flow_noise, posterior_flow
from rectok_fast.reference.posterior_flow import posterior_flow as ref_posterior_flow
from rectok_fast.schedules import default_shift, sample_time, shift_time

GOLDEN = (REFERENCE_DIR or Path("/nonexistent")) / "golden_rectok_tiny.pt"
SHAPES = [(2, 1, 3), (1, 7, 129), (2, 257, 3), (1, 1030, 2)]


def _inputs(B, N, C, device, dtype=torch.float32, spread=1.5):
    moments = (torch.randn(B, N, 2 * C) * spread).to(device=device, dtype=dtype)
    t = torch.rand(B, device=device)
    return moments, t


def _run(fn, moments, t, grads, **kw):
    m = moments.detach().clone().requires_grad_()
    tt = t.detach().clone().requires_grad_()
    out = fn(m, tt, **kw)
    torch.autograd.backward(out, grads)
    return out, m.grad, tt.grad


def _grads(B, N, C, device):
    return (torch.randn(B, N, C, device=device), torch.randn(B, N, C, device=device), torch.randn(B, device=device))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("sample_posterior", [True, False])
def test_seed_matches_reference_on_flow_noise_fp32(kernel_device, shape, gamma, sample_posterior):
    B, N, C = shape
    moments, t = _inputs(B, N, C, kernel_device)
    grads = _grads(B, N, C, kernel_device)
    noise = flow_noise(1234, shape, kernel_device)
    out, dm, dt = _run(
        posterior_flow, moments, t, grads, gamma=gamma, seed=1234, sample_posterior=sample_posterior, backend="triton"
    )
    assert rectok_fast.last_backend("posterior_flow") == "triton"
    ref, rdm, rdt = _run(
        ref_posterior_flow, moments, t, grads, gamma=gamma, noise=noise, sample_posterior=sample_posterior
    )
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dm, rdm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dt, rdt, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu_smoke  # gpu_suite.sh's GPU test step: one case per op
def test_explicit_noise_matches_reference(kernel_device):
    B, N, C = 2, 13, 5
    moments, t = _inputs(B, N, C, kernel_device)
    noise = (torch.randn(B, N, C, device=kernel_device), torch.randn(B, N, C, device=kernel_device))
    grads = _grads(B, N, C, kernel_device)
    out, dm, dt = _run(posterior_flow, moments, t, grads, gamma=0.7, noise=noise, backend="triton")
    ref, rdm, rdt = _run(ref_posterior_flow, moments, t, grads, gamma=0.7, noise=noise)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dm, rdm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dt, rdt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fa_rule(kernel_device, dtype):
    B, N, C = 2, 7, 129
    moments, t = _inputs(B, N, C, kernel_device, dtype=dtype)
    # the same inputs for every path (the gradients rounded to the low dtype), computed in the low
    # dtype by the same-dtype reference and in fp32 by the high reference
    grads = [g.to(dtype) if g.dim() == 3 else g for g in _grads(B, N, C, kernel_device)]
    noise = flow_noise(7, (B, N, C), kernel_device)
    out, dm, dt = _run(posterior_flow, moments, t, grads, seed=7, backend="triton")
    assert out[0].dtype == dtype and out[1].dtype == dtype and out[2].dtype == torch.float32
    low, ldm, ldt = _run(ref_posterior_flow, moments, t, grads, noise=noise)
    hi, hdm, hdt = _run(ref_posterior_flow, moments.float(), t, [g.float() for g in grads], noise=noise)
    for o, lo_, h in zip(out[:2], low[:2], hi[:2]):
        assert_fa_rule(o, lo_, h)
    # the KL is computed in fp32 by every path: only the summation order differs
    torch.testing.assert_close(out[2], hi[2], rtol=1e-5, atol=1e-4)
    assert_fa_rule(dm, ldm, hdm, factor=3.0)
    assert_fa_rule(dt, ldt, hdt, factor=3.0, atol=1e-4)


def test_non_contiguous_moments(kernel_device):
    B, N, C = 2, 9, 6
    base = torch.randn(B, 2 * C, N, device=kernel_device)
    moments = base.transpose(1, 2)  # (B, N, 2C), channel stride N
    assert not moments.is_contiguous()
    t = torch.rand(B, device=kernel_device)
    grads = _grads(B, N, C, kernel_device)
    out, dm, dt = _run(posterior_flow, moments, t, grads, seed=3, backend="triton")
    ref, rdm, rdt = _run(ref_posterior_flow, moments, t, grads, noise=flow_noise(3, (B, N, C), kernel_device))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dm, rdm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dt, rdt, rtol=1e-4, atol=1e-4)


def test_logvar_clamp_zeroes_grad(kernel_device):
    B, N, C = 1, 4, 3
    moments = torch.randn(B, N, 2 * C, device=kernel_device)
    moments[0, 0, C:] = 25.0  # above the clamp
    moments[0, 1, C:] = -40.0  # below the clamp
    t = torch.rand(B, device=kernel_device)
    grads = _grads(B, N, C, kernel_device)
    out, dm, _ = _run(posterior_flow, moments, t, grads, seed=5, backend="triton")
    ref, rdm, _ = _run(ref_posterior_flow, moments, t, grads, noise=flow_noise(5, (B, N, C), kernel_device))
    assert torch.all(dm[0, :2, C:] == 0)
    assert torch.any(dm[0, 2:, C:] != 0)
    torch.testing.assert_close(dm, rdm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-3)


def test_unused_outputs_get_zero_grads(kernel_device):
    B, N, C = 2, 3, 4
    moments, t = _inputs(B, N, C, kernel_device)
    m = moments.clone().requires_grad_()
    tt = t.clone().requires_grad_()
    _, z_t, _ = posterior_flow(m, tt, seed=9, backend="triton")
    z_t.sum().backward()
    m2 = moments.clone().requires_grad_()
    t2 = t.clone().requires_grad_()
    _, r_t, _ = ref_posterior_flow(m2, t2, noise=flow_noise(9, (B, N, C), kernel_device))
    r_t.sum().backward()
    torch.testing.assert_close(m.grad, m2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tt.grad, t2.grad, rtol=1e-4, atol=1e-4)


def test_seed_int_and_tensor_agree_and_determinism(kernel_device):
    B, N, C = 2, 5, 3
    moments, t = _inputs(B, N, C, kernel_device)
    a = posterior_flow(moments, t, seed=42, backend="triton")
    b = posterior_flow(moments, t, seed=torch.tensor(42, device=kernel_device), backend="triton")
    c = posterior_flow(moments, t, seed=43, backend="triton")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[1], c[1])
    d = posterior_flow(moments, t, backend="triton")  # seed drawn from the default generator
    e = posterior_flow(moments, t, backend="triton")
    assert not torch.equal(d[0], e[0])


def test_reference_backend_with_seed_is_deterministic():
    B, N, C = 2, 5, 3
    moments, t = _inputs(B, N, C, "cpu")
    a = posterior_flow(moments, t, seed=8, backend="reference")
    assert rectok_fast.last_backend("posterior_flow") == "reference"
    b = posterior_flow(moments, t, seed=torch.tensor([8]), backend="reference")
    c = posterior_flow(moments, t, seed=9, backend="reference")
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden_rectok_tiny.pt not found (set RECTOK_FAST_REFERENCE_DIR)")
def test_golden_flow_zt_bit_exact(kernel_device):
    g = torch.load(GOLDEN, weights_only=True)["outputs"]
    moments = g["moments"].to(kernel_device)
    eps = g["flow_eps"].to(kernel_device)
    t = g["flow_t"].reshape(-1).to(kernel_device)
    C = moments.shape[-1] // 2
    z, z_t, kl = posterior_flow(
        moments, t, 1.0, noise=(torch.zeros_like(eps), eps), sample_posterior=False, backend="triton"
    )
    # bit for bit under the interpreter (no FMA contraction); a GPU contracts: method §6's 1e-5
    tol = {"rtol": 0, "atol": 0} if kernel_device == "cpu" else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(z_t.cpu(), g["flow_zt"], **tol)
    torch.testing.assert_close(z.cpu(), g["moments"][..., :C], rtol=0, atol=0)
    _, _, rkl = ref_posterior_flow(moments, t, 1.0, noise=(torch.zeros_like(eps), eps), sample_posterior=False)
    torch.testing.assert_close(kl, rkl, rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden_rectok_tiny.pt not found (set RECTOK_FAST_REFERENCE_DIR)")
def test_golden_shift_schedule():
    g = torch.load(GOLDEN, weights_only=True)
    out, cfg = g["outputs"], g["config"]
    grid = cfg["img_size"] // cfg["patch_size"]
    assert default_shift(grid, cfg["token_channels"]) == pytest.approx(float(out["shift"]), rel=1e-6)
    torch.testing.assert_close(shift_time(out["shift_u"], float(out["shift"])), out["shift_t"], rtol=0, atol=0)


def test_sample_time_schedules():
    gen = torch.Generator().manual_seed(0)
    for schedule in ("uniform", "lognorm", "shift"):
        t = sample_time(4096, schedule, shift=3.0, generator=gen)
        assert t.shape == (4096,) and t.dtype == torch.float32
        assert bool((t >= 0).all() and (t <= 1).all())
    # shift s > 1 moves mass towards t = 1 (noise)
    assert sample_time(4096, "shift", shift=3.0, generator=gen).mean() > 0.6
    with pytest.raises(ValueError, match="schedule"):
        sample_time(4, "cosine")


def test_validation_errors():
    moments = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="`t`"):
        posterior_flow(moments, torch.rand(3))
    with pytest.raises(ValueError, match="even"):
        posterior_flow(torch.randn(2, 3, 7), torch.rand(2))
    with pytest.raises(ValueError, match="`moments`"):
        posterior_flow(torch.randn(2, 8), torch.rand(2))
    with pytest.raises(TypeError, match="`moments`"):
        posterior_flow(torch.ones(2, 3, 8, dtype=torch.int64), torch.rand(2))
    with pytest.raises(ValueError, match=r"noise\[1\]"):
        posterior_flow(moments, torch.rand(2), noise=(torch.randn(2, 3, 4), torch.randn(2, 3, 5)))
    with pytest.raises(ValueError, match="either"):
        posterior_flow(moments, torch.rand(2), noise=(torch.randn(2, 3, 4),) * 2, seed=1)
    with pytest.raises(ValueError, match="`t`"):
        posterior_flow(moments, torch.rand(2, device="meta"))
    with pytest.raises(ValueError, match="`seed`"):
        posterior_flow(moments, torch.rand(2), seed=torch.tensor([1, 2]), backend="triton")
    with pytest.raises(TypeError, match="`seed`"):
        posterior_flow(moments, torch.rand(2), seed=1.5, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        posterior_flow(moments, torch.rand(2), backend="cuda")


def test_opcheck(kernel_device):
    B, N, C = 2, 3, 4
    moments, t = _inputs(B, N, C, kernel_device)
    moments.requires_grad_()
    t.requires_grad_()
    seed = torch.tensor([11], device=kernel_device)
    eps = torch.randn(B, N, C, device=kernel_device)
    torch.library.opcheck(torch.ops.rectok_fast.posterior_flow_fwd.default, (moments, t, seed, None, None, 1.0, True))
    torch.library.opcheck(torch.ops.rectok_fast.posterior_flow_fwd.default, (moments, t, None, eps, eps, 0.5, False))
    g = (
        torch.randn(B, N, C, device=kernel_device),
        torch.randn(B, N, C, device=kernel_device),
        torch.randn(B, device=kernel_device),
    )
    torch.library.opcheck(
        torch.ops.rectok_fast.posterior_flow_bwd.default,
        (*g, moments.detach(), t.detach(), seed, None, None, 1.0, True),
    )


def test_gradcheck_fp64_reference_and_kernel(kernel_device):
    B, N, C = 1, 2, 3
    moments = torch.randn(B, N, 2 * C, dtype=torch.float64, device=kernel_device, requires_grad=True)
    t = torch.rand(B, dtype=torch.float64, device=kernel_device, requires_grad=True)
    e1, e2 = (e.double() for e in flow_noise(21, (B, N, C), kernel_device))
    # kl is fp32 by definition (too coarse for finite differences): checked against autograd above
    assert torch.autograd.gradcheck(lambda m, tt: ref_posterior_flow(m, tt, 0.8, noise=(e1, e2))[:2], (moments, t))
    assert torch.autograd.gradcheck(
        lambda m, tt: posterior_flow(m, tt, 0.8, seed=21, backend="triton")[:2], (moments, t)
    )


def test_backward_consistent_with_forward_noise_finite_difference(kernel_device):
    """dL/dt from the backward (noise regenerated) equals a central difference of two seeded forwards."""
    B, N, C = 2, 6, 5
    moments = torch.randn(B, N, 2 * C, dtype=torch.float64, device=kernel_device)
    t = torch.rand(B, dtype=torch.float64, device=kernel_device, requires_grad=True)
    w = torch.randn(B, N, C, dtype=torch.float64, device=kernel_device)
    (posterior_flow(moments, t, seed=99, backend="triton")[1] * w).sum().backward()
    h = 1e-6
    for b in range(B):
        tp, tm = t.detach().clone(), t.detach().clone()
        tp[b] += h
        tm[b] -= h
        fp = (posterior_flow(moments, tp, seed=99, backend="triton")[1] * w).sum()
        fm = (posterior_flow(moments, tm, seed=99, backend="triton")[1] * w).sum()
        assert abs(t.grad[b].item() - ((fp - fm) / (2 * h)).item()) < 1e-6


def test_compile_fullgraph(kernel_device):
    B, N, C = 2, 5, 4
    moments, t = _inputs(B, N, C, kernel_device)
    seed = torch.tensor([5], device=kernel_device)

    def f(m, tt, s):
        z, z_t, kl = posterior_flow(m, tt, 1.0, seed=s, backend="triton")
        return z_t.sum() + kl.sum() + z.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if kernel_device == "cpu" else "inductor")
    m1, t1 = moments.clone().requires_grad_(), t.clone().requires_grad_()
    m2, t2 = moments.clone().requires_grad_(), t.clone().requires_grad_()
    out_c = compiled(m1, t1, seed)
    out_e = f(m2, t2, seed)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(m1.grad, m2.grad)
    torch.testing.assert_close(t1.grad, t2.grad)


def test_auto_backend_on_cpu_is_reference():
    moments, t = _inputs(1, 2, 3, "cpu")
    posterior_flow(moments, t, seed=1)
    assert rectok_fast.last_backend("posterior_flow") == "reference"


# ----------------------------------------------------------------------------- sample_offset


@pytest.mark.parametrize("sample_posterior", [True, False])
def test_sample_offset_slice_equals_global_batch(kernel_device, sample_posterior):
    """A rank's slice [i:j] with sample_offset=i reproduces rows i:j of the global batch bit for bit."""
    B, N, C, i, j = 5, 3, 6, 1, 4
    moments, t = _inputs(B, N, C, kernel_device)
    g = _grads(B, N, C, kernel_device)
    kw = {"gamma": 0.7, "seed": 123, "sample_posterior": sample_posterior, "backend": "triton"}
    full, dm_f, dt_f = _run(posterior_flow, moments, t, g, **kw)
    part, dm_p, dt_p = _run(posterior_flow, moments[i:j], t[i:j], tuple(x[i:j] for x in g), sample_offset=i, **kw)
    for a, b in zip(part, full):
        assert torch.equal(a, b[i:j])
    assert torch.equal(dm_p, dm_f[i:j]) and torch.equal(dt_p, dt_f[i:j])
    assert not torch.equal(posterior_flow(moments[i:j], t[i:j], **kw)[1], part[1])  # the offset matters
    e1, e2 = flow_noise(123, (B, N, C), kernel_device)
    o1, o2 = flow_noise(123, (j - i, N, C), kernel_device, sample_offset=i)
    assert torch.equal(o1, e1[i:j]) and torch.equal(o2, e2[i:j])


def test_sample_offset_int64_and_validation(kernel_device):
    N, C = 2, 3
    big = 2**41 + 5  # counters past 2**32
    moments = torch.zeros(2, N, 2 * C, device=kernel_device)  # mean 0, std 1: z = eps_post
    t = torch.zeros(2, device=kernel_device)
    z, _, _ = posterior_flow(moments, t, seed=9, sample_offset=big, backend="triton")
    e1, _ = flow_noise(9, (2, N, C), kernel_device, sample_offset=big)
    assert torch.equal(z, e1) and not torch.equal(z, flow_noise(9, (2, N, C), kernel_device)[0])
    with pytest.raises(ValueError, match="sample_offset"):
        posterior_flow(moments, t, seed=9, sample_offset=-2, backend="triton")
    with pytest.raises(ValueError, match="int64"):
        posterior_flow(moments, t, seed=9, sample_offset=2**63 - 2, backend="triton")  # global sample index past int64
    with pytest.raises(TypeError, match="sample_offset"):
        posterior_flow(moments, t, seed=9, sample_offset=True, backend="triton")
    with pytest.raises(ValueError, match="reference path"):
        posterior_flow(moments.cpu(), t.cpu(), seed=9, sample_offset=1, backend="reference")
    with pytest.raises(ValueError, match="explicit `noise`"):
        posterior_flow(moments, t, noise=(e1, e1), sample_offset=1, backend="triton")


def test_opcheck_sample_offset(kernel_device):
    B, N, C = 2, 3, 4
    moments, t = _inputs(B, N, C, kernel_device)
    moments.requires_grad_()
    t.requires_grad_()
    seed = torch.tensor([11], device=kernel_device)
    torch.library.opcheck(torch.ops.rectok_fast.posterior_flow_fwd.default, (moments, t, seed, None, None, 1.0, True, 5))
    g = _grads(B, N, C, kernel_device)
    torch.library.opcheck(
        torch.ops.rectok_fast.posterior_flow_bwd.default,
        (*g, moments.detach(), t.detach(), seed, None, None, 1.0, True, 5),
    )


def test_compile_fullgraph_sample_offset(kernel_device):
    B, N, C = 2, 3, 4
    moments, t = _inputs(B, N, C, kernel_device)
    seed = torch.tensor([3], device=kernel_device)

    def f(m, tt, s):
        z, zt, kl = posterior_flow(m, tt, seed=s, sample_offset=4, backend="triton")
        return (z * zt).sum() + kl.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if kernel_device == "cpu" else "inductor")
    m1, t1 = moments.clone().requires_grad_(), t.clone().requires_grad_()
    m2, t2 = moments.clone().requires_grad_(), t.clone().requires_grad_()
    out_c, out_e = compiled(m1, t1, seed), f(m2, t2, seed)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(m1.grad, m2.grad)
    torch.testing.assert_close(t1.grad, t2.grad)


# ----------------------------------------------------------------------------- outputs nobody asked for


def test_zt_only_mode_matches_full_mode(kernel_device):
    B, N, C = 2, 9, 6
    moments, t = _inputs(B, N, C, kernel_device)
    g_zt, g_kl = torch.randn(B, N, C, device=kernel_device), torch.randn(B, device=kernel_device)
    m1, t1 = moments.clone().requires_grad_(), t.clone().requires_grad_()
    z, zt, kl = posterior_flow(m1, t1, seed=4, backend="triton")
    torch.autograd.backward((zt, kl), (g_zt, g_kl))
    m2, t2 = moments.clone().requires_grad_(), t.clone().requires_grad_()
    none, zt2, kl2 = posterior_flow(m2, t2, seed=4, return_z=False, backend="triton")
    assert none is None
    assert torch.equal(zt2, zt) and torch.equal(kl2, kl)
    torch.autograd.backward((zt2, kl2), (g_zt, g_kl))
    assert torch.equal(m2.grad, m1.grad) and torch.equal(t2.grad, t1.grad)
    ref = posterior_flow(moments.cpu(), t.cpu(), noise=flow_noise(4, (B, N, C)), return_z=False, backend="reference")
    assert ref[0] is None


def test_backward_gets_no_zero_gradients(kernel_device, monkeypatch):
    """An unused z (or kl) reaches the backward as None (no zero-filled (B, N, C) gradient is read),
    and without t's gradient the flow noise is not regenerated (need_dt=False)."""
    import importlib

    mod = importlib.import_module("rectok_fast.ops.posterior_flow")
    seen = []
    real = mod._bwd_launch

    def spy(grad_z, grad_zt, grad_kl, *args):
        seen.append((grad_z is None, grad_zt is None, grad_kl is None, args[-2]))
        return real(grad_z, grad_zt, grad_kl, *args)

    monkeypatch.setattr(mod, "_bwd_launch", spy)
    B, N, C = 2, 5, 4
    moments, t = _inputs(B, N, C, kernel_device)
    m = moments.clone().requires_grad_()
    _, z_t, _ = posterior_flow(m, t.clone().requires_grad_(), seed=9, backend="triton")
    z_t.sum().backward()
    m2 = moments.clone().requires_grad_()
    _, z_t2, kl2 = posterior_flow(m2, t, seed=9, backend="triton")  # t needs no grad
    (z_t2.sum() + kl2.sum()).backward()
    assert seen == [(True, False, True, True), (True, False, False, False)]
    m3 = moments.clone().requires_grad_()
    _, r_t, rkl = ref_posterior_flow(m3, t, noise=flow_noise(9, (B, N, C), kernel_device))
    (r_t.sum() + rkl.sum()).backward()
    torch.testing.assert_close(m2.grad, m3.grad, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- clamp convention, NaN


def test_logvar_clamp_gradient_is_inclusive_at_the_bounds(kernel_device):
    """The project's convention: d clamp(x, -30, 20) / dx = 1 where -30 <= x <= 20, bounds included
    (the reference states it with a mask, so it does not depend on the installed torch)."""
    from rectok_fast.reference.posterior_flow import clamp_logvar

    x = torch.tensor([-30.5, -30.0, 0.0, 20.0, 20.5, float("nan")], requires_grad=True)
    y = clamp_logvar(x)
    y.sum().backward()
    assert torch.equal(y[:5].detach(), torch.tensor([-30.0, -30.0, 0.0, 20.0, 20.0])) and torch.isnan(y[5])
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    B, N, C = 1, 4, 2
    moments = torch.zeros(B, N, 2 * C, device=kernel_device)
    moments[0, :, C] = torch.tensor([-30.5, -30.0, 20.0, 20.5])
    t = torch.rand(B, device=kernel_device)
    grads = _grads(B, N, C, kernel_device)
    _, dm, _ = _run(posterior_flow, moments, t, grads, seed=5, backend="triton")
    _, rdm, _ = _run(ref_posterior_flow, moments, t, grads, noise=flow_noise(5, (B, N, C), kernel_device))
    got = dm[0, :, C]
    assert got[0] == 0 and got[3] == 0 and got[1] != 0 and got[2] != 0
    torch.testing.assert_close(dm, rdm, rtol=1e-5, atol=1e-5)


def test_nan_and_inf_propagate_like_the_reference(kernel_device):
    B, N, C = 1, 4, 3
    moments, t = _inputs(B, N, C, kernel_device)
    moments[0, 0, 0] = float("nan")  # a mean
    moments[0, 1, C + 1] = float("nan")  # a logvar
    moments[0, 2, 2] = float("inf")
    grads = _grads(B, N, C, kernel_device)
    noise = flow_noise(6, (B, N, C), kernel_device)
    out, dm, _ = _run(posterior_flow, moments, t, grads, seed=6, backend="triton")
    ref, rdm, _ = _run(ref_posterior_flow, moments, t, grads, noise=noise)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(dm, rdm, rtol=1e-5, atol=1e-5, equal_nan=True)


# ----------------------------------------------------------------------------- seeds without syncs


def test_int_seed_is_a_kernel_scalar_under_compile(kernel_device):
    """An int seed makes no tensor (no host-to-device copy); it works under fullgraph compile and
    gives the tensor seed's numbers."""
    B, N, C = 2, 3, 4
    moments, t = _inputs(B, N, C, kernel_device)

    def f(m, tt):
        _, zt, kl = posterior_flow(m, tt, seed=1234, return_z=False, backend="triton")
        return zt, kl

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if kernel_device == "cpu" else "inductor")
    zt, kl = compiled(moments, t)
    zt_t, kl_t = f(moments, t)
    e_t = posterior_flow(moments, t, seed=torch.tensor([1234], device=kernel_device), backend="triton")
    assert torch.equal(zt, zt_t) and torch.equal(zt, e_t[1])
    torch.testing.assert_close(kl, kl_t)


def test_opcheck_modes(kernel_device):
    B, N, C = 2, 3, 4
    moments, t = _inputs(B, N, C, kernel_device)
    moments.requires_grad_()
    t.requires_grad_()
    op = torch.ops.rectok_fast.posterior_flow_fwd.default
    torch.library.opcheck(op, (moments, t, None, None, None, 1.0, True, 2, 77, False, 7))
    torch.library.opcheck(op, (moments, t, None, None, None, 1.0, False, 0, -5, True, 10))
    gzt = torch.randn(B, N, C, device=kernel_device)
    bop = torch.ops.rectok_fast.posterior_flow_bwd.default
    torch.library.opcheck(
        bop, (None, gzt, None, moments.detach(), t.detach(), None, None, None, 1.0, True, 3, 77, False, 7)
    )
    torch.library.opcheck(
        bop,
        (
            None,
            None,
            torch.randn(B, device=kernel_device),
            moments.detach(),
            t.detach(),
            None,
            None,
            None,
            1.0,
            True,
            0,
            1,
            True,
            10,
        ),
    )


@pytest.mark.triton_gpu
def test_gpu_no_sync_no_recompile_and_cuda_graph():
    """On a GPU: an int seed, a new seed, a new sample offset and a new token count (mask ratio) do
    not sync with the host or compile a new kernel variant; a tensor seed replays in a CUDA graph."""
    import importlib

    kmod = importlib.import_module("rectok_fast.kernels.posterior_flow")
    dev = "cuda"
    moments, t = _inputs(4, 192, 128, dev, dtype=torch.bfloat16)
    posterior_flow(moments, t, seed=1, backend="triton")  # compile
    cache = kmod.posterior_flow_fwd_kernel.device_caches[torch.cuda.current_device()][0]
    n = len(cache)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for seed, off, K in ((2, 0, 192), (2**40 + 3, 8, 192), (-5, 4, 177), (9, 0, 64)):
            posterior_flow(moments[:, :K], t, seed=seed, sample_offset=off, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(cache) == n
    seed = torch.tensor([3], device=dev)
    static = moments.clone()
    g = torch.cuda.CUDAGraph()
    posterior_flow(static, t, seed=seed, backend="triton")  # warm up outside the capture
    with torch.cuda.graph(g):
        out = posterior_flow(static, t, seed=seed, backend="triton")[1]
    seed.fill_(4)
    g.replay()
    assert torch.equal(out, posterior_flow(static, t, seed=4, backend="triton")[1])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy 0·inf, interpreter
def test_gamma_zero_skips_the_flow_noise_exactly(kernel_device):
    """γ = 0: z_t = (1 − t)·z whether the (finite, generated) flow noise is drawn or not; explicit
    noise is still read, so an Inf in it propagates as through the reference (0·Inf = NaN)."""
    B, N, C = 2, 5, 3
    moments, t = _inputs(B, N, C, kernel_device)
    grads = _grads(B, N, C, kernel_device)
    out, dm, dt = _run(posterior_flow, moments, t, grads, gamma=0.0, seed=3, backend="triton")
    ref, rdm, rdt = _run(
        ref_posterior_flow, moments, t, grads, gamma=0.0, noise=flow_noise(3, (B, N, C), kernel_device)
    )
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dm, rdm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dt, rdt, rtol=1e-4, atol=1e-4)
    e1, e2 = flow_noise(3, (B, N, C), kernel_device)
    e2[0, 0, 0] = float("inf")
    z_t = posterior_flow(moments, t, 0.0, noise=(e1, e2), backend="triton")[1]
    r_t = ref_posterior_flow(moments, t, 0.0, noise=(e1, e2))[1]
    assert torch.isnan(z_t[0, 0, 0]) and torch.isnan(r_t[0, 0, 0])
    torch.testing.assert_close(z_t, r_t, rtol=1e-5, atol=1e-5, equal_nan=True)
