"""Triton distmat_align_loss vs the PyTorch reference written from the formula (forward and both gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_fa_rule, max_err

from rectok_fast import last_backend
from rectok_fast import reference as R
from rectok_fast.nn import DistMatAlignLoss
from rectok_fast.ops.distmat import (
    distmat_align_bwd,
    distmat_align_flops,
    distmat_align_fwd,
    distmat_align_loss,
    distmat_tile_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

OP = "distmat_align_loss"


def _formula(s: torch.Tensor, t: torch.Tensor, margin: float) -> torch.Tensor:
    """The issue's formula with explicit loops over the pairs (fp64, tiny shapes only)."""
    B, N, _ = s.shape
    total = 0.0
    for b in range(B):
        for i in range(N):
            for j in range(N):
                cs = torch.nn.functional.cosine_similarity(s[b, i], s[b, j], dim=0, eps=1e-8)
                ct = torch.nn.functional.cosine_similarity(t[b, i], t[b, j], dim=0, eps=1e-8)
                total = total + torch.relu((cs - ct).abs() - margin)
    return total / (B * N * N)


def _run(fn, s, t, margin, grad_target, **kw):
    """Loss and the gradients of (fresh leaf copies of) student and teacher."""
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_(grad_target)
    loss = fn(s, t, margin, grad_target=grad_target, **kw)
    loss.backward()
    return loss.detach(), s.grad, (t.grad if grad_target else None)


def _check_fp32(s, t, margin, grad_target=True):
    """Kernel (fp32) vs the fp64 reference: within 2x the fp32 reference's own error (+ a small atol)."""
    out = _run(distmat_align_loss, s, t, margin, grad_target, backend="triton")
    assert last_backend(OP) == "triton"
    ref32 = _run(R.distmat_align_loss, s, t, margin, grad_target)
    ref64 = _run(R.distmat_align_loss, s.double(), t.double(), margin, grad_target)
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    assert_fa_rule(out[0], ref32[0], ref64[0], atol=1e-6)
    for i, x in ((1, s), (2, t)) if grad_target else ((1, s),):
        assert out[i].dtype == x.dtype and out[i].shape == x.shape
        # gradient scale: ~ 1 / (|x| N) per row
        scale = max(ref64[i].abs().max().item(), 1e-30)
        assert_fa_rule(out[i], ref32[i], ref64[i], atol=1e-5 * scale)
    return out


def test_reference_is_the_formula():
    s = torch.randn(2, 5, 7, dtype=torch.float64)
    t = torch.randn(2, 5, 3, dtype=torch.float64)
    for margin in (0.0, 0.3):
        torch.testing.assert_close(R.distmat_align_loss(s, t, margin), _formula(s, t, margin), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("D,Dt", [(16, 16), (20, 33), (5, 70)])
@pytest.mark.parametrize("N", [1, 7, 33])
def test_matches_reference_fp32(kernel_device, N, D, Dt):
    s = torch.randn(2, N, D, device=kernel_device)
    t = torch.randn(2, N, Dt, device=kernel_device)
    _check_fp32(s, t, 0.1 if D != Dt else 0.0)


def test_several_tiles_and_feature_chunks(kernel_device):
    """More rows than one tile (skipped/doubled off-diagonal tiles, the j loop, more work items than
    persistent programs) and wider features than one chunk (the D loops)."""
    cfg = distmat_tile_config(130, 300, 17)
    N = cfg["BLOCK_I"] + 2
    D = cfg["BLOCK_D"] + 44
    s = torch.randn(3, N, D, device=kernel_device)
    t = s[..., :17] + 0.5 * torch.randn(3, N, 17, device=kernel_device)
    _check_fp32(s, t, 0.05)


@pytest.mark.parametrize("margin", [0.0, 0.2, 2.5])
def test_margin(kernel_device, margin):
    s = torch.randn(2, 9, 24, device=kernel_device)
    t = s + 0.7 * torch.randn(2, 9, 24, device=kernel_device)  # partly aligned: pairs on both sides of the margin
    loss, ds, dt = _check_fp32(s, t, margin)
    if margin >= 2.0:  # |cos_s - cos_t| <= 2: nothing is active
        assert loss.item() == 0.0 and torch.count_nonzero(ds) == 0 and torch.count_nonzero(dt) == 0
    else:
        assert loss.item() > 0 and ds.abs().sum() > 0


def test_identical_structure_is_zero(kernel_device):
    """A teacher that is a rotation + per-token rescaling of the student has the same cosines."""
    s = torch.randn(2, 11, 16, device=kernel_device)
    q, _ = torch.linalg.qr(torch.randn(16, 16, device=kernel_device))
    t = (s @ q) * torch.rand(2, 11, 1, device=kernel_device).add(0.5)
    loss, ds, _ = _run(distmat_align_loss, s, t, 1e-4, False, backend="triton")
    assert loss.item() == 0.0 and torch.count_nonzero(ds) == 0


def test_zero_rows_follow_clamped_norm(kernel_device):
    s = torch.randn(2, 6, 20, device=kernel_device)
    t = torch.randn(2, 6, 12, device=kernel_device)
    s[0, 2] = 0.0
    t[1, 4] = 0.0
    _check_fp32(s, t, 0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,D,Dt", [(7, 40, 24), (33, 64, 20)])
def test_low_precision_fa_rule(kernel_device, dtype, N, D, Dt):
    s = torch.randn(2, N, D, device=kernel_device).to(dtype)
    t = torch.randn(2, N, Dt, device=kernel_device).to(dtype)
    margin = 0.05
    out = _run(distmat_align_loss, s, t, margin, True, backend="triton")
    ref_lp = _run(lambda *a, **k: R.distmat_align_loss(*a, upcast=False, **k), s, t, margin, True)
    ref_32 = _run(R.distmat_align_loss, s.float(), t.float(), margin, True)
    assert out[1].dtype == dtype and out[2].dtype == dtype
    assert_fa_rule(out[0], ref_lp[0], ref_32[0])
    assert_fa_rule(out[1], ref_lp[1], ref_32[1], factor=3.0)
    assert_fa_rule(out[2], ref_lp[2], ref_32[2], factor=3.0)


def test_mixed_dtypes(kernel_device):
    s = torch.randn(2, 7, 32, device=kernel_device).bfloat16()
    t = torch.randn(2, 7, 48, device=kernel_device)
    loss, ds, dt = _run(distmat_align_loss, s, t, 0.0, True, backend="triton")
    rl, rds, rdt = _run(R.distmat_align_loss, s.float(), t, 0.0, True)
    assert ds.dtype == torch.bfloat16 and dt.dtype == torch.float32
    torch.testing.assert_close(loss, rl, rtol=1e-5, atol=1e-6)
    assert max_err(ds, rds) <= 1e-2 * rds.abs().max().item()
    assert max_err(dt, rdt) <= 1e-4 * rdt.abs().max().item()


def test_non_contiguous(kernel_device):
    """Channels-first latents viewed as tokens (stride over D is H·W) and a strided teacher."""
    s = torch.randn(2, 24, 3, 3, device=kernel_device).flatten(2).transpose(1, 2)  # (2, 9, 24)
    t = torch.randn(2, 9, 40, device=kernel_device)[..., ::2]
    assert not s.is_contiguous() and not t.is_contiguous()
    _check_fp32(s, t, 0.1)


def test_grad_target_flag(kernel_device):
    s = torch.randn(2, 5, 16, device=kernel_device, requires_grad=True)
    t = torch.randn(2, 5, 24, device=kernel_device, requires_grad=True)
    distmat_align_loss(s, t, backend="triton").backward()
    assert s.grad is not None and t.grad is None
    distmat_align_loss(s, t, grad_target=True, backend="triton").backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


def test_deterministic(kernel_device):
    s = torch.randn(2, 20, 30, device=kernel_device)
    t = torch.randn(2, 20, 18, device=kernel_device)
    a = _run(distmat_align_loss, s, t, 0.05, True, backend="triton")
    b = _run(distmat_align_loss, s, t, 0.05, True, backend="triton")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_propagate(kernel_device, bad):
    s = torch.randn(2, 6, 16, device=kernel_device)
    t = torch.randn(2, 6, 20, device=kernel_device)
    s[1, 3, 5] = bad
    out = _run(distmat_align_loss, s, t, 0.1, True, backend="triton")
    ref = _run(R.distmat_align_loss, s, t, 0.1, True)
    assert torch.isnan(out[0]) and torch.isnan(ref[0])
    for a, b in zip(out[1:], ref[1:]):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        fin = torch.isfinite(b)
        assert torch.isfinite(a[fin]).all()
    # the teacher side too
    t[0, 0, 0] = bad
    s[1, 3, 5] = 0.0
    out = _run(distmat_align_loss, s, t, 0.0, True, backend="triton")
    ref = _run(R.distmat_align_loss, s, t, 0.0, True)
    assert torch.isnan(out[0]) and torch.isnan(ref[0])
    assert torch.equal(torch.isnan(out[1]), torch.isnan(ref[1]))


@pytest.mark.parametrize("shape_s,shape_t", [((0, 5, 8), (0, 5, 4)), ((2, 0, 8), (2, 0, 4)), ((2, 5, 0), (2, 5, 3))])
def test_empty(kernel_device, shape_s, shape_t):
    s = torch.randn(shape_s, device=kernel_device)
    t = torch.randn(shape_t, device=kernel_device)
    out = _run(distmat_align_loss, s, t, 0.1, True, backend="triton")
    ref = _run(R.distmat_align_loss, s, t, 0.1, True)
    torch.testing.assert_close(out[0], ref[0], equal_nan=True)
    for a, b in zip(out[1:], ref[1:]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, equal_nan=True)


def test_backend_selection():
    s, t = torch.randn(2, 4, 8), torch.randn(2, 4, 6)
    out = distmat_align_loss(s, t, 0.1, backend="reference")
    assert last_backend(OP) == "reference"
    torch.testing.assert_close(out, R.distmat_align_loss(s, t, 0.1))
    distmat_align_loss(s, t)  # auto on CPU tensors -> reference
    assert last_backend(OP) == "reference"
    distmat_align_loss(s.double(), t.double())  # fp64 runs the reference under auto
    assert last_backend(OP) == "reference"


def test_gradcheck_reference_fp64():
    s = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: R.distmat_align_loss(a, b, 0.1, grad_target=True), (s, t))


def test_kernel_gradient_is_the_gradient(kernel_device):
    """The kernel's dstudent against central finite differences of the fp64 reference loss."""
    s = torch.randn(1, 5, 6, device=kernel_device)
    t = torch.randn(1, 5, 4, device=kernel_device)
    _, ds, dt = _run(distmat_align_loss, s, t, 0.05, True, backend="triton")
    f = lambda a, b: R.distmat_align_loss(a, b, 0.05).item()  # noqa: E731
    s64, t64, h = s.double(), t.double(), 1e-6
    num_s = torch.zeros_like(s64)
    for idx in range(s64.numel()):
        e = torch.zeros_like(s64).view(-1)
        e[idx] = h
        e = e.view_as(s64)
        num_s.view(-1)[idx] = (f(s64 + e, t64) - f(s64 - e, t64)) / (2 * h)
    torch.testing.assert_close(ds.double(), num_s, rtol=1e-3, atol=1e-6)
    num_t = torch.zeros_like(t64)
    for idx in range(t64.numel()):
        e = torch.zeros_like(t64).view(-1)
        e[idx] = h
        e = e.view_as(t64)
        num_t.view(-1)[idx] = (f(s64, t64 + e) - f(s64, t64 - e)) / (2 * h)
    torch.testing.assert_close(dt.double(), num_t, rtol=1e-3, atol=1e-6)


def test_opcheck(kernel_device):
    s = torch.randn(2, 7, 20, device=kernel_device, requires_grad=True)
    t = torch.randn(2, 7, 12, device=kernel_device, requires_grad=True)
    torch.library.opcheck(distmat_align_fwd, (s, t, 0.1))
    torch.library.opcheck(distmat_align_fwd, (s, t.detach(), 0.0))
    _, ns, nt = distmat_align_fwd(s.detach(), t.detach(), 0.1)
    g = torch.tensor(1.5, device=kernel_device)
    torch.library.opcheck(distmat_align_bwd, (g, s.detach(), t.detach(), ns, nt, 0.1, True))
    torch.library.opcheck(distmat_align_bwd, (g, s.detach(), t.detach(), ns, nt, 0.1, False))


def test_compile_fullgraph(kernel_device):
    # inductor on the GPU; aot_eager on the CPU (the kernels run in the interpreter there)
    cbackend = "inductor" if kernel_device == "cuda" else "aot_eager"

    def f(a, b, margin, grad_target=True):
        return distmat_align_loss(a, b, 0.1, grad_target=True, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend=cbackend)
    s = torch.randn(2, 9, 24, device=kernel_device)
    t = torch.randn(2, 9, 16, device=kernel_device)
    torch._dynamo.reset()
    a = _run(compiled, s, t, 0.1, True)
    b = _run(distmat_align_loss, s, t, 0.1, True, backend="triton")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_host_read_free(kernel_device):
    """Forward + backward of the functional and the module never read device values back (no syncs)."""
    from test_no_sync import no_host_reads

    s = torch.randn(2, 16, 32, device=kernel_device, requires_grad=True)
    t = torch.randn(2, 16, 24, device=kernel_device, requires_grad=True)
    with no_host_reads() as seen:
        distmat_align_loss(s, t, 0.1, grad_target=True, backend="triton").backward()
        DistMatAlignLoss(0.1, backend="triton")(s, t).backward()
    assert seen == []


def test_margin_validation():
    s, t = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="`margin`"):
            distmat_align_loss(s, t, bad)
        with pytest.raises(ValueError, match="`margin`"):
            DistMatAlignLoss(bad)
    for bad in ("0.1", None, True, torch.tensor(0.1)):
        with pytest.raises(TypeError, match="`margin`"):
            distmat_align_loss(s, t, bad)
    assert distmat_align_loss(s, t, 0).item() >= 0.0  # an int is fine


def test_bad_inputs(kernel_device):
    s, t = torch.randn(2, 3, 8, device=kernel_device), torch.randn(2, 3, 5, device=kernel_device)
    with pytest.raises(TypeError, match="`student`"):
        distmat_align_loss(s.tolist(), t)
    with pytest.raises(TypeError, match="`teacher`"):
        distmat_align_loss(s, t.long())
    with pytest.raises(ValueError, match="`student`"):
        distmat_align_loss(s[0], t)
    with pytest.raises(ValueError, match="`teacher`"):
        distmat_align_loss(s, t[:, :2])
    with pytest.raises(ValueError, match="`teacher`"):
        distmat_align_loss(s, t[:1])
    with pytest.raises(ValueError, match="`teacher`"):
        distmat_align_loss(s, t.to("meta"))
    with pytest.raises(ValueError, match="backend"):
        distmat_align_loss(s, t, backend="cuda")
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        distmat_align_loss(s.double(), t.double(), backend="triton")


def test_module(kernel_device):
    z = torch.randn(2, 16, 3, 5, device=kernel_device)  # channels-first latents, 15 tokens
    f = torch.randn(2, 15, 24, device=kernel_device)
    m = DistMatAlignLoss(0.1, dim=1, backend="triton")
    assert "margin=0.1" in repr(m) and "dim=1" in repr(m)
    got = m(z, f)
    want = R.distmat_align_loss(z.flatten(2).transpose(1, 2), f, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # teacher channels-first too, and the default layout
    torch.testing.assert_close(DistMatAlignLoss(0.1, dim=1, teacher_dim=1)(z, f.transpose(1, 2)), want)
    torch.testing.assert_close(DistMatAlignLoss(0.1)(z.flatten(2).transpose(1, 2), f), want)
    with pytest.raises(ValueError, match="batch"):
        DistMatAlignLoss(dim=0)(z, f)


def test_flops_prediction():
    pred = distmat_align_flops(256, 256, 1024, 1024)
    # symmetric forward: B N (N + 1) (D + Dt) at least; the tiles on the diagonal cost extra
    assert pred["minimum"] == 256 * 256 * 257 * 2048
    assert pred["minimum"] <= pred["flops"] <= 2 * pred["minimum"]
    both = distmat_align_flops(256, 256, 1024, 1024, backward=True)
    assert both["minimum"] == pred["minimum"] + 2 * 256 * 256**2 * (2048 + 1024)
    assert both["flops"] >= both["minimum"]
    assert distmat_align_flops(256, 256, 1024, 1024, backward=True, grad_target=True)["flops"] > both["flops"]
