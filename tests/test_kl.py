"""Triton gaussian_kl and kl_align_loss vs the PyTorch references (forward and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_fa_rule, assert_same_nan_inf, row_pair_with_bad_values
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rectok_fast import last_backend
from rectok_fast import reference as R
from rectok_fast.ops.kl import (
    gaussian_kl,
    gaussian_kl_bwd,
    gaussian_kl_fwd,
    kl_align_bwd,
    kl_align_fwd,
    kl_align_loss,
)
from rectok_fast.reference.posterior_flow import LOGVAR_MAX, LOGVAR_MIN


def _grads(fn, inputs, needs, cotangent=None):
    """fn(*leaf copies) and the gradients of the leaves flagged in ``needs`` (None elsewhere)."""
    leaves = [x.detach().clone().requires_grad_(n) for x, n in zip(inputs, needs)]
    out = fn(*leaves)
    out.backward(cotangent if cotangent is not None else torch.ones_like(out))
    return [out.detach()] + [x.grad if n else None for x, n in zip(leaves, needs)]


def _fa_check(out, ref32, ref64, scale):
    """fp32 kernel vs fp64 truth: at most 2x the fp32 reference's error (+ an atol tied to the scale)."""
    assert_fa_rule(out[0], ref32[0], ref64[0], atol=1e-5 * ref64[0].abs().max().item() + 1e-6)
    for o, r32, r64 in zip(out[1:], ref32[1:], ref64[1:]):
        if r64 is None:
            assert o is None
            continue
        assert_fa_rule(o, r32, r64, atol=1e-5 * scale + 1e-8)


def _assert_low_precision_grad(out, ref_lp, ref_32, device):
    """flash-attention's 3x rule for gradients.  Under the CPU interpreter Triton's fp32 -> bf16 cast
    truncates instead of rounding to nearest (observed with triton 3.8), so there the bf16 check is
    per element: within one bf16 ulp of the fp32 reference."""
    if device == "cpu" and out.dtype == torch.bfloat16:
        err = (out.float() - ref_32.float()).abs()
        bound = 2.0**-7 * 1.01 * ref_32.float().abs() + 1e-6
        assert bool((err <= bound).all()), (
            f"bf16 gradient off by more than one ulp: max excess {(err - bound).max():.3e}"
        )
    else:
        assert_fa_rule(out, ref_lp, ref_32, factor=3.0)


# ============================================================================= gaussian KL


def _gkl_inputs(shape, device, spread=20.0):
    mean = torch.randn(shape, device=device)
    logvar = torch.randn(shape, device=device) * spread  # well past both clamp bounds
    return mean, logvar


def _check_gkl(mean, logvar, logvar_clamp=(-30.0, 20.0)):
    B = mean.shape[0]
    w = torch.randn(B, device=mean.device)  # a non-uniform cotangent
    fn = lambda m, v: gaussian_kl(m, v, logvar_clamp=logvar_clamp, backend="triton")  # noqa: E731
    out = _grads(fn, (mean, logvar), (True, True), w)
    assert last_backend("gaussian_kl") == "triton"
    assert out[0].dtype == torch.float32 and out[0].shape == (B,)
    assert out[1].dtype == mean.dtype and out[2].dtype == logvar.dtype
    rfn = lambda m, v: R.gaussian_kl(m, v, logvar_clamp=logvar_clamp)  # noqa: E731
    ref32 = _grads(rfn, (mean, logvar), (True, True), w)
    ref64 = _grads(rfn, (mean.double(), logvar.double()), (True, True), w.double())
    for i, (o, r) in enumerate(zip(out, ref64)):
        rtol = 2e-5 if i == 0 else 1e-5  # the forward sums up to thousands of terms in fp32
        torch.testing.assert_close(o.double(), r, rtol=rtol, atol=1e-5)
    # clamped entries get no gradient
    if logvar_clamp is not None:
        outside = (logvar < logvar_clamp[0]) | (logvar > logvar_clamp[1])
        assert torch.count_nonzero(out[2][outside]) == 0
    return out, ref32


@pytest.mark.parametrize("shape", [(1, 3), (2, 3), (3, 4, 5, 6), (2, 16, 257), (2, 5000)])
def test_gaussian_kl_matches_reference(kernel_device, shape):
    mean, logvar = _gkl_inputs(shape, kernel_device)
    _check_gkl(mean, logvar)


@pytest.mark.parametrize("logvar_clamp", [None, (-2.0, 1.5)])
def test_gaussian_kl_clamp_options(kernel_device, logvar_clamp):
    mean, logvar = _gkl_inputs((3, 200), kernel_device, spread=2.0 if logvar_clamp is None else 3.0)
    _check_gkl(mean, logvar, logvar_clamp)


def test_gaussian_kl_clamp_gradient_mask(kernel_device):
    """The clamp's gradient passes where lo <= logvar <= hi, bounds included (the project's
    convention, on every torch: torch 2.11's clamp passes at the bounds, 2.14's does not), on both
    backends; 0 outside the range."""
    mean = torch.zeros(2, 4, device=kernel_device)
    logvar = torch.tensor([[-30.0, 20.0, -31.0, 21.0], [0.0, 1.0, -1.0, 19.5]], device=kernel_device)
    g = torch.tensor([1.0, 2.0], device=kernel_device)
    expected = torch.zeros_like(logvar)
    expected[0, 0] = 1.0 * 0.5 * (math.exp(-30.0) - 1.0)
    expected[0, 1] = 1.0 * 0.5 * (math.exp(20.0) - 1.0)
    expected[1] = 2.0 * 0.5 * (logvar[1].exp() - 1.0)
    for backend in ("triton", "reference"):
        _, _, dlv = _grads(lambda m, v, b=backend: gaussian_kl(m, v, backend=b), (mean, logvar), (True, True), g)
        torch.testing.assert_close(dlv, expected, rtol=1e-6, atol=0.0, msg=backend)
    # exactly at a custom bound too, and the reference's mask is not torch.clamp's backward
    lv = torch.tensor([[-2.0, 1.5, 1.5000001, -2.0000002]], device=kernel_device)
    for backend in ("triton", "reference"):
        _, _, dlv = _grads(
            lambda m, v, b=backend: gaussian_kl(m, v, logvar_clamp=(-2.0, 1.5), backend=b), (mean[:1], lv), (True, True)
        )
        assert (dlv[0, :2] != 0).all() and (dlv[0, 2:] == 0).all(), (backend, dlv)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "where, value, clamp",
    [
        ("logvar", NAN, True),
        ("logvar", NAN, False),
        ("logvar", INF, True),
        ("logvar", -INF, True),
        ("logvar", INF, False),
        ("mean", NAN, True),
        ("mean", INF, True),
    ],
)
def test_gaussian_kl_nan_inf_like_reference(kernel_device, where, value, clamp):
    """A NaN logvar gives a NaN KL (the clamp keeps NaN; it used to map to -30) and no gradient
    through the clamp, exactly as the reference; Inf saturates at the clamp."""
    mean, logvar = _gkl_inputs((2, 3, 7), kernel_device)
    x = logvar if where == "logvar" else mean
    x[0, 1, 2] = value
    lc = (LOGVAR_MIN, LOGVAR_MAX) if clamp else None
    out, _ = assert_same_nan_inf(
        lambda m, v: gaussian_kl(m, v, logvar_clamp=lc, backend="triton"),
        lambda m, v: R.gaussian_kl(m, v, logvar_clamp=lc),
        (mean, logvar),
        (True, True),
    )
    if value != value:
        assert out[0].isnan() and not out[1].isnan()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gaussian_kl_low_precision(kernel_device, dtype):
    mean = torch.randn(3, 8, 130, device=kernel_device).to(dtype)
    logvar = (torch.randn(3, 8, 130, device=kernel_device) * 3).to(dtype)
    w = torch.randn(3, device=kernel_device)
    out = _grads(lambda m, v: gaussian_kl(m, v, backend="triton"), (mean, logvar), (True, True), w)
    # the reference upcasts to fp32 (its gradients land in `dtype`): same-dtype reference and fp32 truth
    ref_lp = _grads(R.gaussian_kl, (mean, logvar), (True, True), w)
    ref_32 = _grads(R.gaussian_kl, (mean.float(), logvar.float()), (True, True), w)
    torch.testing.assert_close(out[0], ref_32[0], rtol=1e-5, atol=1e-4)
    assert out[1].dtype == dtype and out[2].dtype == dtype
    _assert_low_precision_grad(out[1], ref_lp[1], ref_32[1], kernel_device)
    _assert_low_precision_grad(out[2], ref_lp[2], ref_32[2], kernel_device)


@pytest.mark.gpu_smoke  # gpu_suite.sh's GPU test step: one case per op
def test_gaussian_kl_non_contiguous_and_mixed_dtypes(kernel_device):
    mean = torch.randn(2, 40, 30, device=kernel_device).transpose(1, 2)
    logvar = (torch.randn(2, 30, 80, device=kernel_device) * 5)[..., ::2]
    assert not mean.is_contiguous() and not logvar.is_contiguous()
    _check_gkl(mean, logvar)
    out = _grads(lambda m, v: gaussian_kl(m, v, backend="triton"), (mean.bfloat16(), logvar), (True, True))
    ref = _grads(R.gaussian_kl, (mean.bfloat16().float(), logvar), (True, True))
    assert out[1].dtype == torch.bfloat16 and out[2].dtype == torch.float32
    torch.testing.assert_close(out[0], ref[0], rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(out[2], ref[2], rtol=1e-5, atol=1e-6)


def test_gaussian_kl_gradcheck_reference_fp64():
    mean = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, v: R.gaussian_kl(m, v, logvar_clamp=(-1.0, 1.0)), (mean, logvar))


def test_gaussian_kl_opcheck(kernel_device):
    mean = torch.randn(3, 50, device=kernel_device, requires_grad=True)
    logvar = (torch.randn(3, 50, device=kernel_device) * 20).requires_grad_()
    torch.library.opcheck(gaussian_kl_fwd, (mean, logvar, -30.0, 20.0, True))
    torch.library.opcheck(gaussian_kl_fwd, (mean, logvar.detach() / 20, 0.0, 0.0, False))
    g = torch.randn(3, device=kernel_device)
    torch.library.opcheck(gaussian_kl_bwd, (g, mean.detach(), logvar.detach(), -30.0, 20.0, True))


def test_gaussian_kl_compile_fullgraph(kernel_device):
    cbackend = "inductor" if kernel_device == "cuda" else "aot_eager"
    f = lambda m, v: gaussian_kl(m, v, backend="triton")  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend=cbackend)
    mean, logvar = _gkl_inputs((2, 4, 33), kernel_device)
    torch._dynamo.reset()
    a = _grads(compiled, (mean, logvar), (True, True))
    b = _grads(f, (mean, logvar), (True, True))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_gaussian_kl_empty_and_backend(kernel_device):
    out = gaussian_kl(
        torch.randn(3, 0, device=kernel_device), torch.randn(3, 0, device=kernel_device), backend="triton"
    )
    assert out.shape == (3,) and torch.count_nonzero(out) == 0
    for shape in ((0, 5), (0, 4, 3), (0, 0)):  # an empty batch: empty results, like the reference
        m = torch.randn(shape, device=kernel_device, requires_grad=True)
        v = torch.randn(shape, device=kernel_device, requires_grad=True)
        out = gaussian_kl(m, v, backend="triton")
        assert out.shape == (0,) and out.dtype == torch.float32
        dm, dv = torch.autograd.grad(out.sum(), (m, v))
        assert dm.shape == shape and dv.shape == shape
    m, v = torch.randn(2, 5), torch.randn(2, 5)
    torch.testing.assert_close(gaussian_kl(m, v), R.gaussian_kl(m, v))  # auto on CPU -> reference
    assert last_backend("gaussian_kl") == "reference"


def test_gaussian_kl_bad_inputs(kernel_device):
    m, v = torch.randn(2, 5, device=kernel_device), torch.randn(2, 5, device=kernel_device)
    with pytest.raises(TypeError, match="`mean`"):
        gaussian_kl(m.tolist(), v)
    with pytest.raises(TypeError, match="`logvar`"):
        gaussian_kl(m, v.int())
    with pytest.raises(ValueError, match="`mean`"):
        gaussian_kl(m[0], v[0])
    with pytest.raises(ValueError, match="`logvar`"):
        gaussian_kl(m, v[:, :4])
    with pytest.raises(ValueError, match="`logvar`"):
        gaussian_kl(m, v.to("meta"))
    with pytest.raises(ValueError, match="`logvar_clamp`"):
        gaussian_kl(m, v, logvar_clamp=(1.0, -1.0))
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        gaussian_kl(m.double(), v.double(), backend="triton")


# ============================================================================= softmax KL alignment

OP = "kl_align_loss"


def _mask(kind, shape, device):
    if kind is None:
        return None
    return {
        "empty": lambda: torch.zeros(shape, dtype=torch.bool, device=device),
        "full": lambda: torch.ones(shape, dtype=torch.bool, device=device),
        "random": lambda: torch.rand(shape, device=device) > 0.5,
        "float": lambda: torch.rand(shape, device=device),
    }[kind]()


def _check_kla(student, teacher, temperature, mask, grad_target=True):
    needs = (True, grad_target)
    out = _grads(
        lambda s, t: kl_align_loss(s, t, temperature, mask, grad_target=grad_target, backend="triton"),
        (student, teacher),
        needs,
    )
    assert last_backend(OP) == "triton"
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    rfn = lambda s, t: R.kl_align_loss(s, t, temperature, mask, grad_target=grad_target)  # noqa: E731
    ref32 = _grads(rfn, (student, teacher), needs)
    ref64 = _grads(rfn, (student.double(), teacher.double()), needs)
    # natural scale of the gradients: T·|p_s - p_t| / count <= 2T / count
    M = max(student[..., 0].numel(), 1)
    _fa_check(out, ref32, ref64, scale=max(ref64[1].abs().max().item(), temperature / M))
    for g, x in zip(out[1:], (student, teacher)):
        if g is not None:
            assert g.dtype == x.dtype and g.shape == x.shape
    return out


@pytest.mark.parametrize("D", [3, 129, 1024, 2048])
@pytest.mark.parametrize("N", [1, 7, 257])
def test_kl_align_matches_reference(kernel_device, D, N):
    s = torch.randn(2, N, D, device=kernel_device) * 2
    t = torch.randn(2, N, D, device=kernel_device) * 2
    _check_kla(s, t, 1.0, _mask("random", (2, N), kernel_device))


@pytest.mark.parametrize("mask_kind", [None, "empty", "full", "random", "float"])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.3])
def test_kl_align_masks_and_temperature(kernel_device, mask_kind, temperature):
    B, N, D = 3, 7, 129
    t = torch.randn(B, N, D, device=kernel_device)
    s = t + torch.randn(B, N, D, device=kernel_device) * 0.5
    mask = _mask(mask_kind, (B, N), kernel_device)
    out = _check_kla(s, t, temperature, mask)
    if mask_kind == "empty":
        assert out[0].item() == 0.0 and torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[2]) == 0
    if mask is not None and mask.dtype == torch.bool:
        assert torch.count_nonzero(out[1][~mask]) == 0 and torch.count_nonzero(out[2][~mask]) == 0


def test_kl_align_large_logits_stable(kernel_device):
    # online softmax across several D chunks with logits of magnitude ~100 and a -1e4 outlier
    s = torch.randn(4, 2500, device=kernel_device) * 30
    t = torch.randn(4, 2500, device=kernel_device) * 30
    s[:, 1800] = 300.0
    t[:, 5] = -1e4
    out = _check_kla(s, t, 1.0, None)
    assert torch.isfinite(out[0]) and torch.isfinite(out[1]).all() and torch.isfinite(out[2]).all()


def test_kl_align_identical_inputs_zero(kernel_device):
    x = torch.randn(5, 300, device=kernel_device)
    out = _check_kla(x, x, 2.0, None)
    assert abs(out[0].item()) < 1e-6 and out[1].abs().max().item() < 1e-7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,N", [(129, 7), (1024, 257), (2048, 7)])
def test_kl_align_low_precision(kernel_device, dtype, D, N):
    s = (torch.randn(2, N, D, device=kernel_device) * 2).to(dtype)
    t = (torch.randn(2, N, D, device=kernel_device) * 2).to(dtype)
    mask = _mask("random", (2, N), kernel_device)
    fn = lambda a, b: kl_align_loss(a, b, 2.0, mask, grad_target=True, backend="triton")  # noqa: E731
    rfn = lambda a, b: R.kl_align_loss(a, b, 2.0, mask, grad_target=True)  # noqa: E731
    out = _grads(fn, (s, t), (True, True))
    # the reference upcasts internally, so its same-dtype error is the rounding of its gradients
    ref_lp = _grads(rfn, (s, t), (True, True))
    ref_32 = _grads(rfn, (s.float(), t.float()), (True, True))
    torch.testing.assert_close(out[0], ref_32[0], rtol=1e-5, atol=1e-6)
    assert out[1].dtype == dtype and out[2].dtype == dtype
    _assert_low_precision_grad(out[1], ref_lp[1], ref_32[1], kernel_device)
    _assert_low_precision_grad(out[2], ref_lp[2], ref_32[2], kernel_device)


@pytest.mark.gpu_smoke  # gpu_suite.sh's GPU test step: one case per op
def test_kl_align_non_contiguous(kernel_device):
    B, N, D = 2, 9, 130
    s = torch.randn(B, D, N, device=kernel_device).transpose(1, 2)
    t = torch.randn(B, N, 2 * D, device=kernel_device)[..., ::2]
    mask = torch.rand(N, B, device=kernel_device).t() > 0.3
    _check_kla(s, t, 1.5, mask)


def test_kl_align_grad_target_flag(kernel_device):
    s = torch.randn(4, 3, 20, device=kernel_device)
    t = torch.randn(4, 3, 20, device=kernel_device)
    _check_kla(s, t, 1.0, None, grad_target=False)
    s_ = s.clone().requires_grad_()
    t_ = t.clone().requires_grad_()
    kl_align_loss(s_, t_, backend="triton").backward()
    assert s_.grad is not None and t_.grad is None


def test_kl_align_gradcheck_reference_fp64():
    s = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a, b: R.kl_align_loss(a, b, 1.7, mask, grad_target=True), (s, t))


def test_kl_align_gradient_formula_fp64():
    # the closed forms the kernel implements, checked against autograd of the reference in fp64
    T, M, D = 1.7, 4, 11
    s = torch.randn(M, D, dtype=torch.float64, requires_grad=True)
    t = torch.randn(M, D, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64)
    R.kl_align_loss(s, t, T, w, grad_target=True).backward()
    log_ps = torch.log_softmax(s.detach() / T, -1)
    log_pt = torch.log_softmax(t.detach() / T, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1, keepdim=True)
    c = (w / w.sum())[:, None]
    torch.testing.assert_close(s.grad, c * T * (log_ps.exp() - log_pt.exp()))
    torch.testing.assert_close(t.grad, c * T * log_pt.exp() * (log_pt - log_ps - kl))


def test_kl_align_opcheck(kernel_device):
    M, D = 6, 20
    s = torch.randn(M, D, device=kernel_device, requires_grad=True)
    t = torch.randn(M, D, device=kernel_device, requires_grad=True)
    w = torch.rand(M, device=kernel_device)
    torch.library.opcheck(kl_align_fwd, (s, t, w, 1.5))
    torch.library.opcheck(kl_align_fwd, (s, t.detach(), None, 1.0))
    _, stats = kl_align_fwd(s.detach(), t.detach(), w, 1.5)
    g = torch.tensor(0.7, device=kernel_device)
    torch.library.opcheck(kl_align_bwd, (g, s.detach(), t.detach(), w, stats, 1.5, True))
    torch.library.opcheck(kl_align_bwd, (g, s.detach(), t.detach(), None, stats, 1.5, False))


def test_kl_align_compile_fullgraph(kernel_device):
    cbackend = "inductor" if kernel_device == "cuda" else "aot_eager"
    mask = torch.rand(2, 5, device=kernel_device) > 0.4
    f = lambda a, b: kl_align_loss(a, b, 2.0, mask, grad_target=True, backend="triton")  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend=cbackend)
    s = torch.randn(2, 5, 48, device=kernel_device)
    t = torch.randn(2, 5, 48, device=kernel_device)
    torch._dynamo.reset()
    a = _grads(compiled, (s, t), (True, True))
    b = _grads(f, (s, t), (True, True))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@settings(max_examples=12, deadline=None)
# large logits (|x/T| ~ 100, KL ~ 85 nats): the teacher gradient cancels at the dominant entries
@example(M=1, D=66, temperature=0.25, spread=8.0, masked=False, seed=0)
@given(
    M=st.integers(1, 20),
    D=st.integers(1, 70),
    temperature=st.floats(0.2, 4.0),
    spread=st.floats(0.1, 10.0),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kl_align_fuzz(M, D, temperature, spread, masked, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(M, D, generator=g) * spread
    t = torch.randn(M, D, generator=g) * spread
    mask = (torch.rand(M, generator=g) > 0.5) if masked else None
    _check_kla(s, t, temperature, mask)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 4), L=st.integers(1, 300), spread=st.floats(0.1, 40.0), seed=st.integers(0, 2**16))
def test_gaussian_kl_fuzz(B, L, spread, seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(B, L, generator=g)
    logvar = torch.randn(B, L, generator=g) * spread
    _check_gkl(mean, logvar)


@pytest.mark.parametrize("grad_target", [False, True])
@pytest.mark.parametrize(
    "where, value", [("student", NAN), ("student", INF), ("student", -INF), ("teacher", NAN), ("teacher", INF)]
)
@pytest.mark.parametrize("D", [8, 67])
def test_kl_align_nan_inf_like_reference(kernel_device, where, value, grad_target, D):
    s, t = torch.randn(2, 3, D, device=kernel_device), torch.randn(2, 3, D, device=kernel_device)
    (s if where == "student" else t)[1, 2, 5] = value
    mask = torch.tensor([[True, False, True], [True, True, False]], device=kernel_device)  # the bad token masked out
    for m in (None, mask):
        assert_same_nan_inf(
            lambda a, b, m=m: kl_align_loss(a, b, 1.5, m, grad_target=grad_target, backend="triton"),
            lambda a, b, m=m: R.kl_align_loss(a, b, 1.5, m, grad_target=grad_target),
            (s, t),
            (True, grad_target),
        )


def test_kl_align_tile_config():
    """GPU tiles: one warp per program, a chunk that divides D when a power of two >= 256 does."""
    from rectok_fast.ops import kl as K

    cases = {
        1024: (1, 1024, True),
        768: (2, 256, True),
        1536: (1, 512, True),
        1000: (1, 1024, False),
        64: (8, 64, True),
    }
    real = K.triton_interpret
    try:
        K.triton_interpret = lambda: False
        for D, (bm, bd, even) in cases.items():
            meta = K.kl_align_tile(65536, D)
            assert (meta["BLOCK_M"], meta["BLOCK_D"], meta["EVEN_D"], meta["num_warps"]) == (bm, bd, even, 1), D
    finally:
        K.triton_interpret = real


def test_kl_align_bad_inputs(kernel_device):
    s, t = torch.randn(2, 3, 8, device=kernel_device), torch.randn(2, 3, 8, device=kernel_device)
    with pytest.raises(TypeError, match="`student`"):
        kl_align_loss(s.tolist(), t)
    with pytest.raises(TypeError, match="`teacher`"):
        kl_align_loss(s, t.long())
    with pytest.raises(ValueError, match="`teacher`"):
        kl_align_loss(s, t[:, :2])
    with pytest.raises(ValueError, match="`temperature`"):
        kl_align_loss(s, t, 0.0)
    for bad in (float("inf"), float("nan"), -float("inf"), -1.0):  # inf used to give NaN
        for backend in ("triton", "reference"):
            with pytest.raises(ValueError, match="`temperature` must be a finite number > 0"):
                kl_align_loss(s, t, bad, backend=backend)
    with pytest.raises(TypeError, match="`temperature`"):
        kl_align_loss(s, t, "1.0")
    with pytest.raises(ValueError, match="`mask`"):
        kl_align_loss(s, t, 1.0, torch.ones(3, 2, dtype=torch.bool, device=kernel_device))
    with pytest.raises(TypeError, match="`mask`"):
        kl_align_loss(s, t, 1.0, torch.ones(2, 3, dtype=torch.int32, device=kernel_device))
    with pytest.raises(ValueError, match="`teacher`"):
        kl_align_loss(s, t.to("meta"))
    with pytest.raises(ValueError, match="`student`"):
        kl_align_loss(s[..., :0], t[..., :0])
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        kl_align_loss(s.double(), t.double(), backend="triton")
    kl_align_loss(s.cpu(), t.cpu(), backend="reference")
    assert last_backend(OP) == "reference"


@settings(max_examples=12, deadline=None)
@given(
    M=st.integers(1, 9),
    D=st.integers(1, 70),
    n_bad=st.integers(0, 3),
    value=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    in_teacher=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kl_align_and_gaussian_kl_fuzz_nan_inf(M, D, n_bad, value, in_teacher, masked, seed):
    """NaN/Inf at random places: forward and gradients equal the reference's, NaN for NaN."""
    s, t, mask, g = row_pair_with_bad_values(M, D, n_bad, value, in_teacher, masked, seed)
    x = t if in_teacher else s
    assert_same_nan_inf(
        lambda a, b: kl_align_loss(a, b, 0.7, mask, grad_target=True, backend="triton"),
        lambda a, b: R.kl_align_loss(a, b, 0.7, mask, grad_target=True),
        (s, t),
        (True, True),
    )
    mean = torch.randn(M, D, generator=g)
    logvar = x * 12  # the same NaN/Inf positions, values past the [-30, 20] clamp too
    assert_same_nan_inf(lambda a, b: gaussian_kl(a, b, backend="triton"), R.gaussian_kl, (mean, logvar), (True, True))
