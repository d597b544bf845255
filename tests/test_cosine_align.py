"""Triton cosine_align_loss vs the PyTorch reference (forward and both gradients)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_fa_rule, assert_same_nan_inf, row_pair_with_bad_values
from hypothesis import given, settings
from hypothesis import strategies as st

from rectok_fast import last_backend
from rectok_fast import reference as R
from rectok_fast.ops.cosine_align import cosine_align_bwd, cosine_align_fwd, cosine_align_loss

OP = "cosine_align_loss"


def _make_mask(kind: str | None, shape: tuple[int, ...], device: str) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if kind == "full":
        return torch.ones(shape, dtype=torch.bool, device=device)
    if kind == "random":
        return torch.rand(shape, device=device) > 0.5
    if kind == "float":
        return torch.rand(shape, device=device)
    raise AssertionError(kind)


def _run(fn, pred, target, mask, margin, grad_target, **kw):
    """Loss and the gradients of the (fresh leaf copies of) pred and target."""
    p = pred.detach().clone().requires_grad_()
    t = target.detach().clone().requires_grad_(grad_target)
    loss = fn(p, t, mask, margin, grad_target=grad_target, **kw)
    loss.backward()
    return loss.detach(), p.grad, (t.grad if grad_target else None)


def _check_fp32(pred, target, mask, margin, grad_target=True):
    """Kernel (fp32) vs the fp64 reference: within 2x the fp32 reference's own error (+ a small atol)."""
    out = _run(cosine_align_loss, pred, target, mask, margin, grad_target, backend="triton")
    assert last_backend(OP) == "triton"
    ref32 = _run(R.cosine_align_loss, pred, target, mask, margin, grad_target)
    ref64 = _run(R.cosine_align_loss, pred.double(), target.double(), mask, margin, grad_target)
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    assert_fa_rule(out[0], ref32[0], ref64[0], atol=1e-6)
    # natural gradient scale: |dcos/dpred| ~ 1/|pred| per token, divided by the token count (<= M)
    M = max(pred[..., 0].numel(), 1)
    inv_norm = 1.0 / torch.minimum(pred.double().norm(dim=-1), target.double().norm(dim=-1)).clamp_min(1e-8)
    scale = max(ref64[1].abs().max().item(), inv_norm.max().item() / M)
    for i in (1, 2) if grad_target else (1,):
        assert out[i].dtype == pred.dtype and out[i].shape == pred.shape
        assert_fa_rule(out[i], ref32[i], ref64[i], atol=1e-5 * scale + 1e-7)
    return out


@pytest.mark.parametrize("D", [3, 129, 1024, 2048])
@pytest.mark.parametrize("N", [1, 7, 257])
def test_matches_reference_fp32(kernel_device, D, N):
    B = 2
    pred = torch.randn(B, N, D, device=kernel_device)
    target = torch.randn(B, N, D, device=kernel_device)
    _check_fp32(pred, target, _make_mask("random", (B, N), kernel_device), 0.0)


@pytest.mark.parametrize("mask_kind", [None, "empty", "full", "random", "float"])
@pytest.mark.parametrize("margin", [0.0, 0.2])
@pytest.mark.parametrize("D", [3, 129])
def test_masks_and_margin(kernel_device, mask_kind, margin, D):
    B, N = 3, 7
    # partly aligned so some tokens fall inside the margin
    target = torch.randn(B, N, D, device=kernel_device)
    pred = target + torch.rand(B, N, 1, device=kernel_device) * 1.5 * torch.randn(B, N, D, device=kernel_device)
    mask = _make_mask(mask_kind, (B, N), kernel_device)
    loss, dp, dt = _check_fp32(pred, target, mask, margin)
    if mask_kind == "empty":
        assert loss.item() == 0.0
        assert torch.count_nonzero(dp) == 0 and torch.count_nonzero(dt) == 0
    if mask is not None and mask.dtype == torch.bool:
        # unselected tokens get exactly zero gradient
        assert torch.count_nonzero(dp[~mask]) == 0 and torch.count_nonzero(dt[~mask]) == 0


def test_margin_inactive_region_zero_grad(kernel_device):
    B, N, D = 2, 5, 64
    target = torch.randn(B, N, D, device=kernel_device)
    pred = target.clone()
    pred[0] = pred[0] + 0.01 * torch.randn(N, D, device=kernel_device)  # 1 - cos ~ 5e-5 < margin
    pred[1] = torch.randn(N, D, device=kernel_device)  # 1 - cos ~ 1 > margin
    loss, dp, dt = _check_fp32(pred, target, None, 0.2)
    assert torch.count_nonzero(dp[0]) == 0 and torch.count_nonzero(dt[0]) == 0
    assert torch.all(dp[1].abs().sum(-1) > 0)
    # everything inside the margin: loss 0, no gradient
    loss, dp, _ = _run(cosine_align_loss, pred[:1], target[:1], None, 0.2, False, backend="triton")
    assert loss.item() == 0.0 and torch.count_nonzero(dp) == 0


def test_zero_vectors_follow_clamped_norm(kernel_device):
    D = 16
    pred = torch.randn(4, D, device=kernel_device)
    target = torch.randn(4, D, device=kernel_device)
    pred[1] = 0.0
    target[2] = 0.0
    _check_fp32(pred, target, None, 0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,N", [(129, 7), (1024, 257), (2048, 7)])
def test_low_precision_fa_rule(kernel_device, dtype, D, N):
    B = 2
    pred = torch.randn(B, N, D, device=kernel_device).to(dtype)
    target = (pred.float() + torch.randn(B, N, D, device=kernel_device)).to(dtype)
    mask = _make_mask("random", (B, N), kernel_device)
    margin = 0.1
    out = _run(cosine_align_loss, pred, target, mask, margin, True, backend="triton")
    ref_lp = _run(lambda *a, **k: R.cosine_align_loss(*a, upcast=False, **k), pred, target, mask, margin, True)
    ref_32 = _run(R.cosine_align_loss, pred.float(), target.float(), mask, margin, True)
    assert out[1].dtype == dtype and out[2].dtype == dtype
    assert_fa_rule(out[0], ref_lp[0], ref_32[0])
    assert_fa_rule(out[1], ref_lp[1], ref_32[1], factor=3.0)
    assert_fa_rule(out[2], ref_lp[2], ref_32[2], factor=3.0)


@pytest.mark.gpu_smoke  # gpu_suite.sh's GPU test step: one case per op
def test_non_contiguous(kernel_device):
    B, N, D = 2, 9, 130
    pred = torch.randn(B, D, N, device=kernel_device).transpose(1, 2)  # stride over D is N
    target = torch.randn(B, N, 2 * D, device=kernel_device)[..., ::2]
    mask = torch.rand(N, B, device=kernel_device).t() > 0.3
    assert not pred.is_contiguous() and not target.is_contiguous() and not mask.is_contiguous()
    _check_fp32(pred, target, mask, 0.1)


def test_leading_shapes_and_mixed_dtypes(kernel_device):
    pred = torch.randn(2, 3, 4, 33, device=kernel_device)
    target = torch.randn(2, 3, 4, 33, device=kernel_device)
    _check_fp32(pred, target, _make_mask("random", (2, 3, 4), kernel_device), 0.0)
    _check_fp32(pred[0, 0, 0], target[0, 0, 0], None, 0.0)  # a single (D,) vector
    # bf16 prediction against an fp32 target
    p16 = pred.bfloat16()
    loss, dp, dt = _run(cosine_align_loss, p16, target, None, 0.0, True, backend="triton")
    rl, rdp, rdt = _run(R.cosine_align_loss, p16.float(), target, None, 0.0, True)
    assert dp.dtype == torch.bfloat16 and dt.dtype == torch.float32
    torch.testing.assert_close(loss, rl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dt, rdt, rtol=1e-4, atol=1e-7)


def test_grad_target_flag(kernel_device):
    pred = torch.randn(5, 40, device=kernel_device, requires_grad=True)
    target = torch.randn(5, 40, device=kernel_device, requires_grad=True)
    cosine_align_loss(pred, target, backend="triton").backward()
    assert pred.grad is not None and target.grad is None
    cosine_align_loss(pred, target, grad_target=True, backend="triton").backward()
    assert target.grad is not None and target.grad.abs().sum() > 0


def test_backend_selection():
    pred, target = torch.randn(3, 8), torch.randn(3, 8)
    out = cosine_align_loss(pred, target, backend="reference")
    assert last_backend(OP) == "reference"
    torch.testing.assert_close(out, R.cosine_align_loss(pred, target))
    cosine_align_loss(pred, target)  # auto on CPU tensors -> reference
    assert last_backend(OP) == "reference"
    cosine_align_loss(pred.double(), target.double())  # fp64 always runs the reference under auto
    assert last_backend(OP) == "reference"


def test_gradcheck_reference_fp64():
    pred = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda p, t: R.cosine_align_loss(p, t, mask, 0.1, grad_target=True), (pred, target))


def test_opcheck(kernel_device):
    M, D = 6, 20
    pred = torch.randn(M, D, device=kernel_device, requires_grad=True)
    target = torch.randn(M, D, device=kernel_device, requires_grad=True)
    weight = torch.rand(M, device=kernel_device)
    torch.library.opcheck(cosine_align_fwd, (pred, target, weight, 0.1))
    torch.library.opcheck(cosine_align_fwd, (pred, target.detach(), None, 0.0))
    _, stats = cosine_align_fwd(pred.detach(), target.detach(), weight, 0.1)
    g = torch.tensor(1.5, device=kernel_device)
    torch.library.opcheck(cosine_align_bwd, (g, pred.detach(), target.detach(), weight, stats, 0.1, True))
    torch.library.opcheck(cosine_align_bwd, (g, pred.detach(), target.detach(), None, stats, 0.1, False))


def test_compile_fullgraph(kernel_device):
    # inductor on the GPU; aot_eager on the CPU (the kernels run in the interpreter there)
    cbackend = "inductor" if kernel_device == "cuda" else "aot_eager"

    def f(p, t, m):
        return cosine_align_loss(p, t, m, 0.1, grad_target=True, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend=cbackend)
    pred = torch.randn(2, 5, 48, device=kernel_device)
    target = torch.randn(2, 5, 48, device=kernel_device)
    mask = torch.rand(2, 5, device=kernel_device) > 0.4
    torch._dynamo.reset()
    a = _run(lambda p, t, m, _margin, **k: compiled(p, t, m), pred, target, mask, 0.1, True)
    b = _run(cosine_align_loss, pred, target, mask, 0.1, True, backend="triton")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@settings(max_examples=12, deadline=None)
@given(
    M=st.integers(1, 20),
    D=st.integers(1, 70),
    margin=st.floats(0.0, 0.6),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz(M, D, margin, masked, seed):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(M, D, generator=g)
    target = torch.randn(M, D, generator=g)
    mask = (torch.rand(M, generator=g) > 0.5) if masked else None
    _check_fp32(pred, target, mask, margin)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("grad_target", [False, True])
@pytest.mark.parametrize(
    "where, value", [("pred", NAN), ("pred", INF), ("pred", -INF), ("target", NAN), ("target", INF)]
)
@pytest.mark.parametrize("D", [8, 67])
def test_nan_inf_like_reference(kernel_device, where, value, grad_target, D):
    """A NaN/Inf token makes the loss NaN (it used to count as 0 on Triton) and its row's gradient
    NaN, exactly as the reference, also when the token is masked out (NaN * 0)."""
    p, t = torch.randn(2, 3, D, device=kernel_device), torch.randn(2, 3, D, device=kernel_device)
    (p if where == "pred" else t)[1, 2, 5] = value
    mask = torch.tensor([[True, False, True], [True, True, False]], device=kernel_device)
    for m in (None, mask):
        out, _ = assert_same_nan_inf(
            lambda a, b, m=m: cosine_align_loss(a, b, m, 0.1, grad_target=grad_target, backend="triton"),
            lambda a, b, m=m: R.cosine_align_loss(a, b, m, 0.1, grad_target=grad_target),
            (p, t),
            (True, grad_target),
        )
        assert out.isnan()


@pytest.mark.parametrize("margin", [NAN, INF, -INF, 2])
def test_margin_nan_inf_like_reference(kernel_device, margin):
    """margin=nan: loss NaN (it used to be 0.0) and the gradient torch's relu passes for NaN."""
    p, t = torch.randn(2, 3, 8, device=kernel_device), torch.randn(2, 3, 8, device=kernel_device)
    out, grads = assert_same_nan_inf(
        lambda a, b: cosine_align_loss(a, b, None, margin, backend="triton"),
        lambda a, b: R.cosine_align_loss(a, b, None, margin),
        (p, t),
        (True, False),
    )
    if margin != margin:
        assert out.isnan() and grads[0].abs().sum() > 0


def test_bad_inputs(kernel_device):
    p, t = torch.randn(2, 3, 8, device=kernel_device), torch.randn(2, 3, 8, device=kernel_device)
    with pytest.raises(TypeError, match="`pred`"):
        cosine_align_loss(p.tolist(), t)
    with pytest.raises(TypeError, match="`target`"):
        cosine_align_loss(p, t.long())
    with pytest.raises(ValueError, match="`target`"):
        cosine_align_loss(p, t[..., :7])
    with pytest.raises(ValueError, match="`mask`"):
        cosine_align_loss(p, t, torch.ones(3, 2, dtype=torch.bool, device=kernel_device))
    with pytest.raises(TypeError, match="`mask`"):
        cosine_align_loss(p, t, torch.ones(2, 3, dtype=torch.int64, device=kernel_device))
    with pytest.raises(ValueError, match="`target`"):
        cosine_align_loss(p, t.to("meta"))
    with pytest.raises(ValueError, match="`pred`"):
        cosine_align_loss(p[..., :0], t[..., :0])
    with pytest.raises(ValueError, match="backend"):
        cosine_align_loss(p, t, backend="cuda")
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        cosine_align_loss(p.double(), t.double(), backend="triton")
    for backend in ("triton", "reference"):  # one rule for both paths
        for bad in ("0.1", None, True, torch.tensor(0.1)):
            with pytest.raises(TypeError, match="`margin`"):
                cosine_align_loss(p, t, None, bad, backend=backend)


@settings(max_examples=12, deadline=None)
@given(
    M=st.integers(1, 9),
    D=st.integers(1, 70),
    n_bad=st.integers(0, 3),
    value=st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0]),
    in_target=st.booleans(),
    masked=st.booleans(),
    margin=st.sampled_from([0.0, 0.3, float("nan")]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_nan_inf(M, D, n_bad, value, in_target, masked, margin, seed):
    """NaN/Inf (and zeros: clamped norms) at random places: forward and gradients as the reference's."""
    p, t, mask, _ = row_pair_with_bad_values(M, D, n_bad, value, in_target, masked, seed)
    assert_same_nan_inf(
        lambda a, b: cosine_align_loss(a, b, mask, margin, grad_target=True, backend="triton"),
        lambda a, b: R.cosine_align_loss(a, b, mask, margin, grad_target=True),
        (p, t),
        (True, True),
    )
