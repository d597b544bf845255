"""flow_matching_xt / flow_matching_loss (Triton, in-kernel x0) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_fa_rule

import rectok_fast
from rectok_fast.ops.flow_matching import flow_matching_loss, flow_matching_noise, flow_matching_xt
from rectok_fast.reference.flow_matching import flow_matching_loss as ref_loss
from rectok_fast.reference.flow_matching import flow_matching_xt as ref_xt

SHAPES = [(1, 1), (2, 7), (3, 257), (2, 129, 3), (2, 4, 5, 7), (2, 2049), (1, 3, 1500), (2, 4096)]  # last: no masks


def _exact(kernel_device):
    """Tolerances of x_t against the eager reference given the same x0: bit for bit under the
    interpreter (which never contracts mul+add into an FMA), to rounding on a GPU (FMA on)."""
    return {"rtol": 0, "atol": 0} if kernel_device == "cpu" else {"rtol": 1e-6, "atol": 1e-6}


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _xt_and_grads(fn, x1, t, g, **kw):
    a, tt = _leaf(x1), _leaf(t)
    out = fn(a, tt, **kw)
    out.backward(g)
    return out, a.grad, tt.grad


def _loss_and_grads(fn, pred, x1, t, *args, **kw):
    p, a = _leaf(pred), _leaf(x1)
    out = fn(p, a, t, *args, **kw)
    out.backward()
    return out, p.grad, a.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_xt_seed_matches_reference_fp32(kernel_device, shape):
    x1 = torch.randn(shape, device=kernel_device)
    t = torch.rand(shape[0], device=kernel_device)
    g = torch.randn(shape, device=kernel_device)
    x0 = flow_matching_noise(77, shape, kernel_device)
    out, dx1, dt = _xt_and_grads(flow_matching_xt, x1, t, g, seed=77, backend="triton")
    assert rectok_fast.last_backend("flow_matching_xt") == "triton"
    ref, rdx1, rdt = _xt_and_grads(lambda a, tt: ref_xt(a, tt, x0), x1, t, g)
    torch.testing.assert_close(out, ref, **_exact(kernel_device))  # same op order
    torch.testing.assert_close(dx1, rdx1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dt, rdt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_loss_seed_matches_reference_fp32(kernel_device, shape):
    x1 = torch.randn(shape, device=kernel_device)
    pred = torch.randn(shape, device=kernel_device)
    t = torch.rand(shape[0], device=kernel_device)
    x0 = flow_matching_noise(78, shape, kernel_device)
    out, dp, dx1 = _loss_and_grads(flow_matching_loss, pred, x1, t, seed=78, backend="triton")
    assert out.dtype == torch.float32 and out.dim() == 0
    ref, rdp, rdx1 = _loss_and_grads(ref_loss, pred, x1, t, x0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dp, rdp, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dx1, rdx1, rtol=1e-5, atol=1e-7)


def test_explicit_noise_matches_reference(kernel_device):
    shape = (3, 5, 6)
    x1, pred, x0 = (torch.randn(shape, device=kernel_device) for _ in range(3))
    t = torch.rand(3, device=kernel_device)
    g = torch.randn(shape, device=kernel_device)
    out, dx1, dt = _xt_and_grads(flow_matching_xt, x1, t, g, noise=x0, backend="triton")
    ref, rdx1, rdt = _xt_and_grads(lambda a, tt: ref_xt(a, tt, x0), x1, t, g)
    torch.testing.assert_close(out, ref, **_exact(kernel_device))
    torch.testing.assert_close(dt, rdt, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx1, rdx1)
    loss, dp, dx = _loss_and_grads(flow_matching_loss, pred, x1, t, noise=x0, backend="triton")
    rloss, rdp, rdx = _loss_and_grads(ref_loss, pred, x1, t, x0)
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dp, rdp)
    torch.testing.assert_close(dx, rdx)


def test_xt_and_loss_share_x0(kernel_device):
    """With the same seed the loss sees the x0 that built x_t: pred = x1 − x0 gives zero loss."""
    shape = (2, 3, 17)
    x1 = torch.randn(shape, device=kernel_device)
    t = torch.full((2,), 0.0, device=kernel_device)
    seed = torch.tensor([5], device=kernel_device)
    x0 = flow_matching_xt(x1, t, seed=seed, backend="triton")  # t = 0: x_t = x0
    assert torch.equal(x0, flow_matching_noise(5, shape, kernel_device))
    assert flow_matching_loss(x1 - x0, x1, t, seed=seed, backend="triton").item() < 1e-12
    assert flow_matching_loss(x1 - x0, x1, t, seed=6, backend="triton").item() > 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fa_rule(kernel_device, dtype):
    shape = (2, 129, 3)
    x1 = torch.randn(shape, device=kernel_device)
    pred = torch.randn(shape, device=kernel_device)
    t = torch.rand(2, device=kernel_device)
    g = torch.randn(shape, device=kernel_device)
    x0 = flow_matching_noise(3, shape, kernel_device)
    lo = [x.to(dtype) for x in (x1, pred, g)]
    out, dx1, dt = _xt_and_grads(flow_matching_xt, lo[0], t, lo[2], seed=3, backend="triton")
    assert out.dtype == dtype
    low, ldx1, ldt = _xt_and_grads(lambda a, tt: ref_xt(a, tt, x0.to(dtype)), lo[0], t, lo[2])
    hi, hdx1, hdt = _xt_and_grads(lambda a, tt: ref_xt(a, tt, x0), lo[0].float(), t, lo[2].float())
    assert_fa_rule(out, low, hi)
    assert_fa_rule(dx1, ldx1, hdx1, factor=3.0)
    assert_fa_rule(dt, ldt, hdt, factor=3.0, atol=1e-4)
    loss, dp, dx = _loss_and_grads(flow_matching_loss, lo[1], lo[0], t, seed=3, backend="triton")
    lloss, ldp, ldx = _loss_and_grads(ref_loss, lo[1], lo[0], t, x0.to(dtype))
    hloss, hdp, hdx = _loss_and_grads(ref_loss, lo[1].float(), lo[0].float(), t, x0)
    assert_fa_rule(loss, lloss, hloss)
    assert_fa_rule(dp, ldp, hdp, factor=3.0)
    assert_fa_rule(dx, ldx, hdx, factor=3.0)


@pytest.mark.gpu_smoke  # gpu_suite.sh's GPU test step: one case per op
def test_non_contiguous_inputs(kernel_device):
    x1 = torch.randn(3, 6, 5, device=kernel_device).transpose(1, 2)  # (3, 5, 6) non-contiguous
    pred = torch.randn(3, 5, 12, device=kernel_device)[..., ::2]  # (3, 5, 6) strided
    assert not x1.is_contiguous() and not pred.is_contiguous()
    t = torch.rand(3, device=kernel_device)
    g = torch.randn(x1.shape, device=kernel_device)
    x0 = flow_matching_noise(4, x1.shape, kernel_device)
    out, dx1, dt = _xt_and_grads(flow_matching_xt, x1, t, g, seed=4, backend="triton")
    ref, rdx1, rdt = _xt_and_grads(lambda a, tt: ref_xt(a, tt, x0), x1, t, g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx1, rdx1)
    torch.testing.assert_close(dt, rdt, rtol=1e-4, atol=1e-4)
    loss, dp, dx = _loss_and_grads(flow_matching_loss, pred, x1, t, seed=4, backend="triton")
    rloss, rdp, rdx = _loss_and_grads(ref_loss, pred, x1, t, x0)
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dp, rdp)
    torch.testing.assert_close(dx, rdx)


def test_seed_int_tensor_and_default(kernel_device):
    x1 = torch.randn(2, 9, device=kernel_device)
    t = torch.rand(2, device=kernel_device)
    a = flow_matching_xt(x1, t, seed=12, backend="triton")
    b = flow_matching_xt(x1, t, seed=torch.tensor(12, device=kernel_device), backend="triton")
    c = flow_matching_xt(x1, t, seed=13, backend="triton")
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = flow_matching_xt(x1, t, backend="triton")
    e = flow_matching_xt(x1, t, backend="triton")
    assert not torch.equal(d, e)


def test_reference_backend_seeded():
    x1, pred = torch.randn(2, 9), torch.randn(2, 9)
    t = torch.rand(2)
    a = flow_matching_xt(x1, t, seed=12, backend="reference")
    assert rectok_fast.last_backend("flow_matching_xt") == "reference"
    assert torch.equal(a, flow_matching_xt(x1, t, seed=12, backend="reference"))
    assert not torch.equal(a, flow_matching_xt(x1, t, seed=13, backend="reference"))
    la = flow_matching_loss(pred, x1, t, seed=12)  # auto on CPU tensors -> reference
    assert rectok_fast.last_backend("flow_matching_loss") == "reference"
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(la, ref_loss(pred, x1, t, x0))


def test_validation_errors():
    x1 = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="`t`"):
        flow_matching_xt(x1, torch.rand(3))
    with pytest.raises(ValueError, match="`t`"):
        flow_matching_loss(x1, x1, torch.rand(2, 2))
    with pytest.raises(ValueError, match="`pred`"):
        flow_matching_loss(torch.randn(2, 3, 5), x1, torch.rand(2))
    with pytest.raises(ValueError, match="`noise`"):
        flow_matching_xt(x1, torch.rand(2), noise=torch.randn(2, 3))
    with pytest.raises(TypeError, match="`x1`"):
        flow_matching_xt(torch.ones(2, 3, dtype=torch.int32), torch.rand(2))
    with pytest.raises(ValueError, match="either"):
        flow_matching_xt(x1, torch.rand(2), noise=torch.randn_like(x1), seed=1)
    with pytest.raises(ValueError, match="`t`"):
        flow_matching_xt(x1, torch.rand(2, device="meta"))
    with pytest.raises(ValueError, match="`x1`"):
        flow_matching_xt(torch.tensor(1.0), torch.rand(1))


def test_opcheck(kernel_device):
    x1 = torch.randn(2, 3, 5, device=kernel_device, requires_grad=True)
    pred = torch.randn(2, 3, 5, device=kernel_device, requires_grad=True)
    t = torch.rand(2, device=kernel_device, requires_grad=True)
    seed = torch.tensor([3], device=kernel_device)
    x0 = torch.randn(2, 3, 5, device=kernel_device)
    ops = torch.ops.rectok_fast
    torch.library.opcheck(ops.flow_matching_xt_fwd.default, (x1, t, seed, None))
    torch.library.opcheck(ops.flow_matching_xt_fwd.default, (x1, t, None, x0))
    torch.library.opcheck(ops.flow_matching_loss_fwd.default, (pred, x1, seed, None))
    torch.library.opcheck(ops.flow_matching_loss_fwd.default, (pred, x1, None, x0))
    g = torch.randn(2, 3, 5, device=kernel_device)
    torch.library.opcheck(ops.flow_matching_xt_bwd.default, (g, x1.detach(), t.detach(), seed, None))
    torch.library.opcheck(
        ops.flow_matching_loss_bwd.default,
        (torch.tensor(1.5, device=kernel_device), pred.detach(), x1.detach(), seed, None),
    )


def test_gradcheck_fp64_reference_and_kernel(kernel_device):
    x1 = torch.randn(2, 3, dtype=torch.float64, device=kernel_device, requires_grad=True)
    pred = torch.randn(2, 3, dtype=torch.float64, device=kernel_device, requires_grad=True)
    t = torch.rand(2, dtype=torch.float64, device=kernel_device, requires_grad=True)
    x0 = flow_matching_noise(9, (2, 3), kernel_device, torch.float64)
    assert torch.autograd.gradcheck(lambda a, tt: ref_xt(a, tt, x0), (x1, t))
    assert torch.autograd.gradcheck(lambda a, tt: flow_matching_xt(a, tt, seed=9, backend="triton"), (x1, t))
    # the loss is fp32 by definition: gradcheck its fp64 reference math, compare the kernel to autograd above
    assert torch.autograd.gradcheck(lambda p, a: ((p - (a - x0)) ** 2).mean(), (pred, x1))
    lp, la = _leaf(pred), _leaf(x1)
    flow_matching_loss(lp, la, t.detach(), seed=9, backend="triton").backward()
    rp, ra = _leaf(pred), _leaf(x1)
    ((rp - (ra - x0)) ** 2).mean().backward()
    torch.testing.assert_close(lp.grad, rp.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(la.grad, ra.grad, rtol=1e-12, atol=1e-12)


def test_compile_fullgraph(kernel_device):
    x1 = torch.randn(2, 4, 6, device=kernel_device)
    t = torch.rand(2, device=kernel_device)
    seed = torch.tensor([1], device=kernel_device)
    w = torch.randn(2, 4, 6, device=kernel_device)

    def f(a, tt, s):
        xt = flow_matching_xt(a, tt, seed=s, backend="triton")
        return flow_matching_loss(xt * w, a, tt, seed=s, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if kernel_device == "cpu" else "inductor")
    a1, t1, a2, t2 = _leaf(x1), _leaf(t), _leaf(x1), _leaf(t)
    out_c, out_e = compiled(a1, t1, seed), f(a2, t2, seed)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(t1.grad, t2.grad)


# ----------------------------------------------------------------------------- sample_offset


def test_sample_offset_slice_equals_global_batch(kernel_device):
    """A rank's slice [i:j] with sample_offset=i sees rows i:j of the global batch's x0, bit for bit."""
    B, i, j = 5, 2, 4
    x1 = torch.randn(B, 3, 7, device=kernel_device)
    pred = torch.randn(B, 3, 7, device=kernel_device)
    t = torch.rand(B, device=kernel_device)
    g = torch.randn(B, 3, 7, device=kernel_device)
    kw = {"seed": 77, "backend": "triton"}
    full, dx_f, dt_f = _xt_and_grads(flow_matching_xt, x1, t, g, **kw)
    part, dx_p, dt_p = _xt_and_grads(flow_matching_xt, x1[i:j], t[i:j], g[i:j], sample_offset=i, **kw)
    assert torch.equal(part, full[i:j]) and torch.equal(dx_p, dx_f[i:j]) and torch.equal(dt_p, dt_f[i:j])
    assert not torch.equal(part, flow_matching_xt(x1[i:j], t[i:j], **kw))  # the offset matters
    x0 = flow_matching_noise(77, (B, 3, 7), kernel_device)
    assert torch.equal(flow_matching_noise(77, (j - i, 3, 7), kernel_device, sample_offset=i), x0[i:j])
    # the loss is a local mean: equal to the explicit-noise loss on the global x0's rows, grads too
    lo, dp, da = _loss_and_grads(flow_matching_loss, pred[i:j], x1[i:j], t[i:j], sample_offset=i, **kw)
    lr, dpr, dar = _loss_and_grads(flow_matching_loss, pred[i:j], x1[i:j], t[i:j], noise=x0[i:j], backend="triton")
    assert torch.equal(lo, lr) and torch.equal(dp, dpr) and torch.equal(da, dar)


def test_sample_offset_int64_and_validation(kernel_device):
    big = 2**40 + 3  # counters past 2**32 and 2**31: stream index e = big·M + ...
    a = flow_matching_noise(5, (2, 4), kernel_device, sample_offset=big)
    x1 = torch.zeros(2, 4, device=kernel_device)
    xt = flow_matching_xt(x1, torch.zeros(2, device=kernel_device), seed=5, sample_offset=big, backend="triton")
    assert torch.equal(xt, a)  # x_t = x0 at t = 0
    assert not torch.equal(a, flow_matching_noise(5, (2, 4), kernel_device))
    with pytest.raises(ValueError, match="sample_offset"):
        flow_matching_xt(x1, torch.zeros(2, device=kernel_device), seed=5, sample_offset=-1, backend="triton")
    with pytest.raises(ValueError, match="int64"):
        flow_matching_xt(x1, torch.zeros(2, device=kernel_device), seed=5, sample_offset=2**63 - 2, backend="triton")
    with pytest.raises(TypeError, match="sample_offset"):
        flow_matching_xt(x1, torch.zeros(2, device=kernel_device), seed=5, sample_offset=1.0, backend="triton")
    with pytest.raises(ValueError, match="reference path"):
        flow_matching_loss(x1, x1, torch.zeros(2), seed=5, sample_offset=1, backend="reference")
    with pytest.raises(ValueError, match="explicit `noise`"):
        flow_matching_xt(x1, torch.zeros(2, device=kernel_device), noise=x1, sample_offset=1, backend="triton")


def test_opcheck_sample_offset(kernel_device):
    x1 = torch.randn(2, 3, 5, device=kernel_device, requires_grad=True)
    pred = torch.randn(2, 3, 5, device=kernel_device, requires_grad=True)
    t = torch.rand(2, device=kernel_device, requires_grad=True)
    seed = torch.tensor([3], device=kernel_device)
    ops = torch.ops.rectok_fast
    torch.library.opcheck(ops.flow_matching_xt_fwd.default, (x1, t, seed, None, 3))
    torch.library.opcheck(ops.flow_matching_loss_fwd.default, (pred, x1, seed, None, 3))
    g = torch.randn(2, 3, 5, device=kernel_device)
    torch.library.opcheck(ops.flow_matching_xt_bwd.default, (g, x1.detach(), t.detach(), seed, None, 3))
    torch.library.opcheck(
        ops.flow_matching_loss_bwd.default,
        (torch.tensor(1.5, device=kernel_device), pred.detach(), x1.detach(), seed, None, 3),
    )


def test_compile_fullgraph_sample_offset(kernel_device):
    x1 = torch.randn(3, 8, device=kernel_device)
    t = torch.rand(3, device=kernel_device)
    seed = torch.tensor([4], device=kernel_device)

    def f(a, tt, s):
        xt = flow_matching_xt(a, tt, seed=s, sample_offset=6, backend="triton")
        return flow_matching_loss(xt, a, tt, seed=s, sample_offset=6, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if kernel_device == "cpu" else "inductor")
    a1, t1, a2, t2 = _leaf(x1), _leaf(t), _leaf(x1), _leaf(t)
    out_c, out_e = compiled(a1, t1, seed), f(a2, t2, seed)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(t1.grad, t2.grad)


# ----------------------------------------------------------------------------- only the gradients asked for


def test_backward_writes_only_requested_gradients(kernel_device, monkeypatch):
    """x1 without grad: no dx1 is written (need_dx1=False); t without grad: no dL/dt partials and
    no x0 regeneration in flow_matching_xt's backward.  Values equal the full computation's."""
    import importlib

    mod = importlib.import_module("rectok_fast.ops.flow_matching")
    seen = []
    real_loss, real_xt = mod._loss_bwd, mod._xt_bwd

    def spy_loss(*a):
        seen.append(("loss", a[-3], a[-2]))
        return real_loss(*a)

    def spy_xt(*a):
        seen.append(("xt", a[-3], a[-2]))
        return real_xt(*a)

    monkeypatch.setattr(mod, "_loss_bwd", spy_loss)
    monkeypatch.setattr(mod, "_xt_bwd", spy_xt)
    shape = (2, 3, 700)
    x1, pred = torch.randn(shape, device=kernel_device), torch.randn(shape, device=kernel_device)
    t = torch.rand(2, device=kernel_device)
    p1 = _leaf(pred)
    flow_matching_loss(p1, x1, t, seed=8, backend="triton").backward()  # x1 needs no grad
    _, p2g, x1g = _loss_and_grads(flow_matching_loss, pred, x1, t, seed=8, backend="triton")
    assert torch.equal(p1.grad, p2g)
    a = _leaf(x1)
    flow_matching_xt(a, t, seed=8, backend="triton").backward(torch.ones(shape, device=kernel_device))  # t no grad
    assert torch.equal(a.grad, t.reshape(2, 1, 1).expand(shape))
    assert seen[0] == ("loss", True, False) and seen[1] == ("loss", True, True) and seen[2] == ("xt", True, False)


def test_int_seed_under_compile_and_opcheck_modes(kernel_device):
    x1 = torch.randn(2, 4, 6, device=kernel_device)
    t = torch.rand(2, device=kernel_device)

    def f(a, tt):
        return flow_matching_xt(a, tt, seed=99, philox_rounds=7, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if kernel_device == "cpu" else "inductor")
    assert torch.equal(compiled(x1, t), f(x1, t))
    x0 = flow_matching_noise(99, (2, 4, 6), kernel_device, philox_rounds=7)
    torch.testing.assert_close(f(x1, t), ref_xt(x1, t, x0), **_exact(kernel_device))
    ops = torch.ops.rectok_fast
    xg, tg = x1.clone().requires_grad_(), t.clone().requires_grad_()
    torch.library.opcheck(ops.flow_matching_xt_fwd.default, (xg, tg, None, None, 1, -3, 7))
    torch.library.opcheck(ops.flow_matching_loss_fwd.default, (xg, x1, None, None, 0, 2**40, 10))
    g = torch.randn(2, 4, 6, device=kernel_device)
    torch.library.opcheck(ops.flow_matching_xt_bwd.default, (g, x1, t, None, None, 0, 5, False, True, 10))
    torch.library.opcheck(ops.flow_matching_xt_bwd.default, (g, x1, t, None, None, 0, 5, True, False, 10))
    torch.library.opcheck(
        ops.flow_matching_loss_bwd.default,
        (torch.tensor(1.5, device=kernel_device), x1, x1, None, None, 0, 5, True, False, 10),
    )


# ----------------------------------------------------------------------------- cosine term (LightningDiT)

COS_SHAPES = [(2, 1, 5), (2, 3, 5), (1, 7, 1), (3, 3, 1, 1), (2, 7, 5), (2, 3, 300), (3, 5)]
COS_SHAPES += [(2, 70, 3, 100), (2, 128, 4, 4)]  # C over two chunks, several position tiles; paper C
# S dividing FM_LANE = 512 with C >= 4K (K = 512 // S) takes the paired layout (one Philox call per
# four channels), here with C not a multiple of 4K; (2, 70, 2, 4) and (1, 600, 1) have C < 4K
COS_SHAPES += [(2, 9, 16, 16), (2, 70, 2, 4), (2, 33, 512), (1, 600, 1), (1, 2050, 1)]
PAIRED = {(2, 9, 16, 16), (2, 33, 512), (1, 2050, 1), (2, 128, 4, 4), (3, 5, 512), (5, 6, 512)}


def test_cosine_layouts_covered():
    """The shapes below exercise both kernel layouts (the tests would not notice a layout never taken)."""
    from rectok_fast.ops.flow_matching import _cos_layout

    for shape in COS_SHAPES + [(3, 5, 6), (3, 5, 512), (5, 3, 7), (5, 6, 512), (2, 3, 4)]:
        x = torch.empty(shape)
        assert _cos_layout(x, x)[3] == (shape in PAIRED), shape


def _cos_ref(x0, w=0.5, **kw):
    return lambda p, a, tt: ref_loss(p, a, tt, x0, cosine_weight=w, **kw)


def _cos_formula(pred, x1, x0, w):
    """LightningDiT's loss written out: mse + w·mean(1 − cos over dim 1), eps as F.cosine_similarity."""
    v = x1 - x0
    cos = (pred * v).sum(1) / (pred.norm(dim=1).clamp_min(1e-8) * v.norm(dim=1).clamp_min(1e-8))
    return ((pred - v) ** 2).mean() + w * (1 - cos).mean()


@pytest.mark.parametrize("shape", COS_SHAPES)
def test_cosine_seed_matches_reference_fp32(kernel_device, shape):
    x1 = torch.randn(shape, device=kernel_device)
    pred = torch.randn(shape, device=kernel_device)
    t = torch.rand(shape[0], device=kernel_device)
    x0 = flow_matching_noise(41, shape, kernel_device)
    out, dp, dx1 = _loss_and_grads(flow_matching_loss, pred, x1, t, seed=41, cosine_weight=0.5, backend="triton")
    assert out.dtype == torch.float32 and out.dim() == 0
    ref, rdp, rdx1 = _loss_and_grads(_cos_ref(x0), pred, x1, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dp, rdp, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dx1, rdx1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ref, _cos_formula(pred, x1, x0, 0.5), rtol=1e-6, atol=1e-6)
    plain = flow_matching_loss(pred, x1, t, seed=41, backend="triton")
    assert abs(out.item() - plain.item()) > 1e-3  # the term is there


@pytest.mark.parametrize("S", [6, 512])  # per-element lanes; paired layout
def test_cosine_non_contiguous_and_explicit_noise_equal_seed(kernel_device, S):
    x1 = torch.randn(3, S, 5, device=kernel_device).transpose(1, 2)  # (3, 5, S) strided
    pred = torch.randn(3, 5, 2 * S, device=kernel_device)[..., ::2]
    t = torch.rand(3, device=kernel_device)
    x0 = flow_matching_noise(12, (3, 5, S), kernel_device)
    kw = {"cosine_weight": 1.5, "backend": "triton"}
    a = _loss_and_grads(flow_matching_loss, pred, x1, t, seed=12, **kw)
    b = _loss_and_grads(flow_matching_loss, pred, x1, t, noise=x0, **kw)
    for u, v in zip(a, b):
        assert torch.equal(u, v)  # generated x0 == the materialised stream, same op order
    r = _loss_and_grads(_cos_ref(x0, 1.5), pred, x1, t)
    for u, v in zip(a, r):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cosine_low_precision_fa_rule(kernel_device, dtype):
    shape = (2, 7, 5)
    x1, pred = torch.randn(shape, device=kernel_device), torch.randn(shape, device=kernel_device)
    t = torch.rand(2, device=kernel_device)
    x0 = flow_matching_noise(3, shape, kernel_device)
    lo = [x.to(dtype) for x in (x1, pred)]
    loss, dp, dx = _loss_and_grads(flow_matching_loss, lo[1], lo[0], t, seed=3, cosine_weight=0.8, backend="triton")
    assert dp.dtype == dtype and dx.dtype == dtype
    lloss, ldp, ldx = _loss_and_grads(_cos_ref(x0.to(dtype), 0.8), lo[1], lo[0], t)
    hloss, hdp, hdx = _loss_and_grads(_cos_ref(x0, 0.8), lo[1].float(), lo[0].float(), t)
    assert_fa_rule(loss, lloss, hloss)
    assert_fa_rule(dp, ldp, hdp, factor=3.0)
    assert_fa_rule(dx, ldx, hdx, factor=3.0)


def test_cosine_nan_inf_propagate(kernel_device):
    shape = (2, 3, 5)
    x1, pred = torch.randn(shape, device=kernel_device), torch.randn(shape, device=kernel_device)
    pred[0, 1, 2] = float("nan")
    x1[1, 0, 4] = float("inf")
    t = torch.rand(2, device=kernel_device)
    x0 = flow_matching_noise(5, shape, kernel_device)
    out, dp, dx = _loss_and_grads(flow_matching_loss, pred, x1, t, seed=5, cosine_weight=0.5, backend="triton")
    ref, rdp, rdx = _loss_and_grads(_cos_ref(x0), pred, x1, t)
    assert out.isnan() and ref.isnan()
    assert torch.equal(dp.isnan(), rdp.isnan()) and torch.equal(dx.isnan(), rdx.isnan())
    assert dp.isnan().any() and not dp.isnan().all()  # a NaN stays within its (sample, position)
    torch.testing.assert_close(dp, rdp, rtol=1e-5, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(dx, rdx, rtol=1e-5, atol=1e-7, equal_nan=True)


def test_cosine_zero_vectors_and_empty(kernel_device):
    """|pred| = 0 at a position: cos = 0 (eps clamp), gradient as torch's; an empty batch is NaN."""
    shape = (2, 4, 3)
    x1, pred = torch.randn(shape, device=kernel_device), torch.randn(shape, device=kernel_device)
    pred[0, :, 1] = 0
    pred[1, :, 2] = 1e-10  # below eps
    t = torch.rand(2, device=kernel_device)
    x0 = flow_matching_noise(6, shape, kernel_device)
    out, dp, dx = _loss_and_grads(flow_matching_loss, pred, x1, t, seed=6, cosine_weight=2.0, backend="triton")
    ref, rdp, rdx = _loss_and_grads(_cos_ref(x0, 2.0), pred, x1, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dp, rdp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, rdx, rtol=1e-5, atol=1e-7)
    e1, e2 = _leaf(torch.randn(0, 3, 5, device=kernel_device)), _leaf(torch.randn(0, 3, 5, device=kernel_device))
    loss = flow_matching_loss(e1, e2, torch.rand(0, device=kernel_device), seed=1, cosine_weight=1.0, backend="triton")
    assert loss.isnan()
    loss.backward()
    assert e1.grad.shape == (0, 3, 5) and e2.grad.shape == (0, 3, 5)


@pytest.mark.parametrize("C, S", [(3, 7), (6, 512)])  # per-element lanes; paired layout
def test_cosine_sample_offset_slice_bit_exact(kernel_device, C, S):
    B, i, j = 5, 1, 4
    shape = (B, C, S)
    x1, pred = torch.randn(shape, device=kernel_device), torch.randn(shape, device=kernel_device)
    t = torch.rand(B, device=kernel_device)
    x0 = flow_matching_noise(77, shape, kernel_device)
    kw = {"cosine_weight": 0.3, "backend": "triton"}
    a = _loss_and_grads(flow_matching_loss, pred[i:j], x1[i:j], t[i:j], seed=77, sample_offset=i, **kw)
    b = _loss_and_grads(flow_matching_loss, pred[i:j], x1[i:j], t[i:j], noise=x0[i:j], **kw)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], flow_matching_loss(pred[i:j], x1[i:j], t[i:j], seed=77, **kw))


def test_cosine_gradcheck_fp64(kernel_device):
    from rectok_fast.reference.flow_matching import velocity_cosine_loss

    pred = torch.randn(2, 3, 4, dtype=torch.float64, device=kernel_device, requires_grad=True)
    v = torch.randn(2, 3, 4, dtype=torch.float64, device=kernel_device, requires_grad=True)
    assert torch.autograd.gradcheck(velocity_cosine_loss, (pred, v))
    x1 = torch.randn(2, 3, 4, dtype=torch.float64, device=kernel_device)
    x0 = flow_matching_noise(9, (2, 3, 4), kernel_device, torch.float64)
    t = torch.rand(2, dtype=torch.float64, device=kernel_device)
    k = _loss_and_grads(flow_matching_loss, pred, x1, t, seed=9, cosine_weight=0.7, backend="triton")
    r = _loss_and_grads(lambda p, a, tt: _cos_formula(p, a, x0, 0.7), pred, x1, t)
    torch.testing.assert_close(k[1], r[1], rtol=1e-12, atol=1e-12)  # fp64 accumulation for fp64 inputs
    torch.testing.assert_close(k[2], r[2], rtol=1e-12, atol=1e-12)


def test_cosine_weight_zero_uses_the_plain_kernels(kernel_device, monkeypatch):
    from rectok_fast._backend import kernels

    mod = kernels("flow_matching")
    shape = (2, 3, 5)
    x1, pred = torch.randn(shape, device=kernel_device), torch.randn(shape, device=kernel_device)
    t = torch.rand(2, device=kernel_device)
    base = _loss_and_grads(flow_matching_loss, pred, x1, t, seed=4, backend="triton")

    class _Boom:
        def __getitem__(self, grid):
            raise AssertionError("cosine kernel launched")

    monkeypatch.setattr(mod, "flow_cos_loss_fwd_kernel", _Boom())
    monkeypatch.setattr(mod, "flow_cos_loss_bwd_kernel", _Boom())
    zero = _loss_and_grads(flow_matching_loss, pred, x1, t, seed=4, cosine_weight=0.0, backend="triton")
    for u, v in zip(base, zero):
        assert torch.equal(u, v)
    with pytest.raises(AssertionError, match="cosine kernel"):
        flow_matching_loss(pred, x1, t, seed=4, cosine_weight=0.1, backend="triton")


def test_cosine_validation():
    x1 = torch.randn(4)
    with pytest.raises(ValueError, match="channel dim"):
        flow_matching_loss(x1, x1, torch.rand(4), seed=1, cosine_weight=1.0)
    for bad in (float("nan"), float("inf"), True, torch.tensor(1.0)):
        with pytest.raises(ValueError, match="cosine_weight"):
            flow_matching_loss(torch.randn(2, 3), torch.randn(2, 3), torch.rand(2), seed=1, cosine_weight=bad)


def test_cosine_reference_backend():
    shape = (2, 3, 5)
    x1, pred, x0 = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    t = torch.rand(2)
    out = flow_matching_loss(pred, x1, t, noise=x0, cosine_weight=0.4, backend="reference")
    torch.testing.assert_close(out, _cos_formula(pred, x1, x0, 0.4))


def test_cosine_opcheck_and_compile(kernel_device):
    x1 = torch.randn(2, 3, 5, device=kernel_device, requires_grad=True)
    pred = torch.randn(2, 3, 5, device=kernel_device, requires_grad=True)
    seed = torch.tensor([3], device=kernel_device)
    x0 = torch.randn(2, 3, 5, device=kernel_device)
    ops = torch.ops.rectok_fast
    torch.library.opcheck(ops.flow_matching_loss_fwd.default, (pred, x1, seed, None, 0, 0, 10, 0.5))
    torch.library.opcheck(ops.flow_matching_loss_fwd.default, (pred, x1, None, x0, 0, 0, 10, 0.5))
    torch.library.opcheck(ops.flow_matching_loss_fwd.default, (pred, x1, None, None, 2, 7, 7, 0.5))
    g = torch.tensor(1.5, device=kernel_device)
    torch.library.opcheck(
        ops.flow_matching_loss_bwd.default, (g, pred.detach(), x1.detach(), seed, None, 1, 0, True, True, 10, 0.5)
    )
    torch.library.opcheck(
        ops.flow_matching_loss_bwd.default, (g, pred.detach(), x1.detach(), None, x0, 0, 0, False, True, 10, 0.5)
    )
    t = torch.rand(2, device=kernel_device)

    def f(p, a, s):
        return flow_matching_loss(p, a, t, seed=s, cosine_weight=0.5, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if kernel_device == "cpu" else "inductor")
    p1, a1, p2, a2 = _leaf(pred), _leaf(x1), _leaf(pred), _leaf(x1)
    out_c, out_e = compiled(p1, a1, seed), f(p2, a2, seed)
    torch.testing.assert_close(out_c, out_e)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(p1.grad, p2.grad)
    torch.testing.assert_close(a1.grad, a2.grad)


@pytest.mark.parametrize("time", ["rectok", "sit"])
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_cosine_module_flow_matching_loss(kernel_device, time, path):
    """nn.FlowMatchingLoss(cosine_weight=) is mse + w·mean(1 − cos(pred, v)) with the module's v."""
    from rectok_fast.nn import FlowMatchingLoss

    shape = (2, 5, 3, 2)
    x1, pred, eps = (torch.randn(shape, device=kernel_device) for _ in range(3))
    t = torch.rand(2, device=kernel_device)
    fm = FlowMatchingLoss(time=time, path=path, cosine_weight=0.6)
    assert "cosine_weight=0.6" in repr(fm)
    backend = "triton" if path == "linear" else "reference"
    out, dp, _ = _loss_and_grads(lambda p, a, tt: fm(p, a, tt, noise=eps, backend=backend), pred, x1, t)
    v = fm.target(x1, t, eps)
    ref, rdp, _ = _loss_and_grads(lambda p, a, tt: _cos_formula(p, v + 0 * a, 0, 0.6), pred, x1, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dp, rdp, rtol=1e-5, atol=1e-7)
    if path == "linear":  # seeded: the fused op with the regenerated noise
        x0 = flow_matching_noise(8, shape, kernel_device)
        seeded = fm(pred, x1, t, 8, backend="triton")
        assert torch.equal(seeded, fm(pred, x1, t, noise=x0, backend="triton"))
    with pytest.raises(ValueError, match="cosine_weight"):
        FlowMatchingLoss(cosine_weight=float("nan"))


def test_cosine_ditdh_training_loss():
    """DiTDH.training_loss(cosine_weight=): LightningDiT's loss, fused (seeded) and reference (noise)."""
    import torch.nn.functional as F

    from rectok_fast.models.ditdh import DiTDH

    torch.manual_seed(3)
    m = DiTDH(in_channels=8, input_size=4, hidden_size=(32, 48), depth=(1, 1), num_heads=(2, 2), num_classes=5)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    B = 3
    x1, y, t = torch.randn(B, 8, 4, 4), torch.tensor([0, 1, 2]), torch.rand(B)
    x0 = flow_matching_noise(9, (B, 8, 4, 4), "cpu")
    kw = {"t": t, "label_drop": 0.0, "cosine_weight": 0.5}
    fused = m.training_loss(x1, y, seed=9, backend="triton", **kw)
    ref = m.training_loss(x1, y, noise=x0, backend="reference", **kw)
    tt = t.view(-1, 1, 1, 1)
    pred, v = m(tt * x1 + (1 - tt) * x0, t, y), x1 - x0
    want = (pred - v).pow(2).mean() + 0.5 * (1 - F.cosine_similarity(pred, v, dim=1)).mean()
    torch.testing.assert_close(ref, want)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    assert abs(fused.item() - m.training_loss(x1, y, seed=9, backend="triton", t=t, label_drop=0.0).item()) > 1e-3
