"""patchify / unpatchify: C++ (CPU) and CUDA kernels against the PyTorch reference."""

from __future__ import annotations

import importlib

import pytest
import torch

import rectok_fast
from rectok_fast.ops.patchify import patchify, unpatchify
from rectok_fast.reference.patchify import patchify as ref_patchify
from rectok_fast.reference.patchify import unpatchify as ref_unpatchify

# the module (rectok_fast.ops exposes the *function* `patchify` under the same name)
patch_mod = importlib.import_module("rectok_fast.ops.patchify")
needs_ext = pytest.mark.skipif(not patch_mod.HAS_EXTENSION, reason="C++ extension rectok_fast._C not built")
pytestmark = needs_ext

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# (B, C, gh, gw, p): C = 1, 3, 5; p = 1, 2, 16; non-square grids; B = 1
SHAPES = [(1, 1, 3, 5, 1), (2, 3, 4, 4, 2), (1, 5, 2, 3, 16), (3, 3, 7, 2, 2), (2, 3, 1, 1, 16)]


def _ids(B: int, N: int, K: int, device="cpu") -> torch.Tensor:
    return torch.stack([torch.randperm(N, device=device)[:K] for _ in range(B)])


def _ref_unpatchify_ids(tokens, p, C, gh, gw, ids):
    B, _, D = tokens.shape
    full = tokens.new_zeros(B, gh * gw, D).scatter(1, ids.long().unsqueeze(-1).expand(-1, -1, D), tokens)
    return ref_unpatchify(full, p, C, (gh, gw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_matches_reference(shape, dtype):
    B, C, gh, gw, p = shape
    x = torch.randn(B, C, gh * p, gw * p, dtype=dtype, requires_grad=True)
    out = patchify(x, p, backend="cpp")
    assert rectok_fast.last_backend("patchify") == "cpp"
    xr = x.detach().clone().requires_grad_()
    ref = ref_patchify(xr, p)
    assert out.shape == (B, gh * gw, C * p * p) and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # a copy: bit-exact in every dtype
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=0)

    t = torch.randn(B, gh * gw, C * p * p, dtype=dtype, requires_grad=True)
    img = unpatchify(t, p, C, (gh, gw), backend="cpp")
    assert rectok_fast.last_backend("unpatchify") == "cpp"
    tr = t.detach().clone().requires_grad_()
    img_ref = ref_unpatchify(tr, p, C, (gh, gw))
    torch.testing.assert_close(img, img_ref, rtol=0, atol=0)
    gi = torch.randn_like(img)
    img.backward(gi)
    img_ref.backward(gi)
    torch.testing.assert_close(t.grad, tr.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_roundtrip_all_dtypes(dtype):
    x = torch.randn(2, 3, 8, 12).to(dtype)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 3, (2, 3)), x)


@pytest.mark.parametrize("K", ["zero", "full", "random"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ids_keep(K, dtype):
    B, C, gh, gw, p = 3, 3, 3, 5, 2
    N = gh * gw
    k = {"zero": 0, "full": N, "random": 7}[K]
    ids = _ids(B, N, k)
    x = torch.randn(B, C, gh * p, gw * p, dtype=dtype, requires_grad=True)
    out = patchify(x, p, ids, backend="cpp")
    xr = x.detach().clone().requires_grad_()
    ref = ref_patchify(xr, p, ids)
    assert out.shape == (B, k, C * p * p)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=0)
    if k < N:  # cells nobody kept get zero gradient
        assert (x.grad == 0).any() or k == 0

    img = unpatchify(out.detach(), p, C, (gh, gw), ids_keep=ids, backend="cpp")
    torch.testing.assert_close(img, _ref_unpatchify_ids(out.detach(), p, C, gh, gw, ids), rtol=0, atol=0)
    img_ref_backend = unpatchify(out.detach(), p, C, (gh, gw), ids_keep=ids, backend="reference")
    assert rectok_fast.last_backend("unpatchify") == "reference"
    torch.testing.assert_close(img, img_ref_backend, rtol=0, atol=0)


def test_ids_keep_int32_accepted_and_full_permutation_roundtrip():
    x = torch.randn(2, 3, 8, 8)
    ids = _ids(2, 16, 16)
    t = patchify(x, 2, ids.int())
    torch.testing.assert_close(t, ref_patchify(x, 2, ids), rtol=0, atol=0)
    assert torch.equal(unpatchify(t, 2, 3, 4, ids_keep=ids.int()), x)


def test_non_contiguous_inputs():
    base = torch.randn(2, 12, 3, 8)  # (B, W, C, H) -> permute to (B, C, H, W): non-contiguous
    x = base.permute(0, 2, 3, 1)
    assert not x.is_contiguous()
    torch.testing.assert_close(patchify(x, 4, backend="cpp"), ref_patchify(x, 4), rtol=0, atol=0)
    ids = _ids(2, 6, 4).t().contiguous().t()  # non-contiguous ids
    assert not ids.is_contiguous()
    torch.testing.assert_close(patchify(x, 4, ids, backend="cpp"), ref_patchify(x, 4, ids), rtol=0, atol=0)
    t = torch.randn(48, 6, 2).permute(2, 1, 0)  # (2, 6, 48) non-contiguous
    assert not t.is_contiguous()
    torch.testing.assert_close(unpatchify(t, 4, 3, (2, 3), backend="cpp"), ref_unpatchify(t, 4, 3, (2, 3)))
    # direct op calls with non-contiguous inputs also work
    torch.testing.assert_close(torch.ops.rectok_fast.patchify(x, 4, None), ref_patchify(x, 4), rtol=0, atol=0)


def test_linear_over_patchify_equals_conv2d():
    B, C, H, W, p, d = 2, 3, 32, 48, 16, 24
    x = torch.randn(B, C, H, W)
    conv = torch.nn.Conv2d(C, d, p, stride=p)
    lin = torch.nn.Linear(C * p * p, d)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.reshape(d, -1))
        lin.bias.copy_(conv.bias)
        a = lin(patchify(x, p, backend="cpp"))
        b = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_ids", [False, True])
def test_opcheck(with_ids):
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    ids = _ids(2, 6, 4) if with_ids else None
    torch.library.opcheck(torch.ops.rectok_fast.patchify.default, (x, 2, ids))
    T = 4 if with_ids else 6
    t = torch.randn(2, T, 12, requires_grad=True)
    torch.library.opcheck(torch.ops.rectok_fast.unpatchify.default, (t, 2, 3, 2, 3, ids))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("with_ids", [False, True])
def test_gradcheck_fp64(backend, with_ids):
    ids = _ids(2, 6, 3) if with_ids else None
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: patchify(a, 2, ids, backend=backend), (x,))
    assert torch.autograd.gradgradcheck(lambda a: patchify(a, 2, ids, backend=backend), (x,))
    t = torch.randn(2, 3 if with_ids else 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: unpatchify(a, 2, 2, (2, 3), ids_keep=ids, backend=backend), (t,))


@pytest.mark.parametrize("with_ids", [False, True])
def test_torch_compile_fullgraph(with_ids):
    torch._dynamo.reset()
    ids = _ids(2, 6, 4) if with_ids else None

    def f(x):
        t = patchify(x, 2, ids, backend="cpp")
        return unpatchify(t * 2, 2, 3, (2, 3), ids_keep=ids, backend="cpp")

    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    ref = f(x.detach())
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.sum().backward()
    expected = torch.full_like(x, 2.0)
    if with_ids:
        expected = unpatchify(patchify(expected, 2, ids), 2, 3, (2, 3), ids_keep=ids)
    torch.testing.assert_close(x.grad, expected)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 4, 6)
    out = torch.compile(lambda a: unpatchify(patchify(a, 2) + 1, 2, 3, (2, 3)), fullgraph=True)(x)
    torch.testing.assert_close(out, x + 1)


def test_backend_selection():
    x = torch.randn(1, 3, 4, 4)
    patchify(x, 2)
    assert rectok_fast.last_backend("patchify") == "cpp"  # auto on CPU with the extension loaded
    patchify(x, 2, backend="reference")
    assert rectok_fast.last_backend("patchify") == "reference"
    with pytest.raises(ValueError, match="backend"):
        patchify(x, 2, backend="triton")


def test_cpp_backend_without_extension_raises(monkeypatch):
    monkeypatch.setattr(patch_mod, "HAS_EXTENSION", False)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(RuntimeError, match="not built"):
        patchify(x, 2, backend="cpp")
    patchify(x, 2)  # auto falls back to the reference, and says so
    assert rectok_fast.last_backend("patchify") == "reference"


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda: patchify(torch.randn(3, 4, 4), 2), ValueError, "images"),
        (lambda: patchify([1.0], 2), TypeError, "images"),
        (lambda: patchify(torch.ones(1, 3, 4, 4, dtype=torch.int32), 2), TypeError, "images"),
        (lambda: patchify(torch.randn(1, 3, 4, 6), 4), ValueError, "patch_size"),
        (lambda: patchify(torch.randn(1, 3, 4, 4), 0), ValueError, "patch_size"),
        (lambda: patchify(torch.randn(1, 3, 4, 4), 2.0), TypeError, "patch_size"),
        (lambda: patchify(torch.randn(1, 3, 4, 4), 2, torch.zeros(1, 2)), TypeError, "ids_keep"),
        (lambda: patchify(torch.randn(1, 3, 4, 4), 2, torch.zeros(2, 2, dtype=torch.long)), ValueError, "ids_keep"),
        (lambda: patchify(torch.randn(1, 3, 4, 4), 2, torch.zeros(2, dtype=torch.long)), ValueError, "ids_keep"),
        (lambda: patchify(torch.randn(1, 3, 4, 4), 2, torch.tensor([[0, 4]])), ValueError, "ids_keep"),
        (lambda: patchify(torch.randn(1, 3, 4, 4), 2, torch.tensor([[-1, 2]])), ValueError, "ids_keep"),
        (lambda: patchify(torch.randn(1, 3, 4, 4), 2, torch.tensor([[1, 1]])), ValueError, "ids_keep"),
        (lambda: unpatchify(torch.randn(1, 4), 2, 3, 2), ValueError, "tokens"),
        (lambda: unpatchify(torch.randn(1, 4, 11), 2, 3, 2), ValueError, "tokens"),
        (lambda: unpatchify(torch.randn(1, 5, 12), 2, 3, 2), ValueError, "tokens"),
        (lambda: unpatchify(torch.randn(1, 4, 12), 2, 0, 2), ValueError, "channels"),
        (lambda: unpatchify(torch.randn(1, 4, 12), 2, 3, (2, 2, 1)), ValueError, "grid"),
        (lambda: unpatchify(torch.randn(1, 4, 12), 2, 3, "2"), TypeError, "grid"),
        (
            lambda: unpatchify(torch.randn(1, 2, 12), 2, 3, 2, ids_keep=torch.tensor([[0, 1, 2]])),
            ValueError,
            "ids_keep",
        ),
        (lambda: unpatchify(torch.randn(1, 2, 12), 2, 3, 2, ids_keep=torch.tensor([[0, 9]])), ValueError, "ids_keep"),
    ],
)
def test_bad_input_raises_naming_argument(call, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        call()


def test_eager_ids_checks_can_be_turned_off(monkeypatch):
    """RECTOK_FAST_CHECK_INDICES=0 skips the functionals' host-syncing checks (range and duplicates)."""
    x = torch.randn(1, 3, 4, 4)
    dup = torch.tensor([[1, 1]])
    with pytest.raises(ValueError, match="`ids_keep`"):
        patchify(x, 2, dup, backend="reference")
    monkeypatch.setenv("RECTOK_FAST_CHECK_INDICES", "0")
    out = patchify(x, 2, dup, backend="reference")
    full = ref_patchify(x, 2)
    assert torch.equal(out, full[:, [1, 1]])
    with pytest.raises(RuntimeError, match="duplicate"):  # the CPU kernel still checks (no device sync there)
        patchify(x, 2, dup, backend="cpp")


def test_cpu_kernel_checks_ids_directly():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(RuntimeError, match="ids_keep"):
        torch.ops.rectok_fast.patchify(x, 2, torch.tensor([[0, 4]]))
    with pytest.raises(RuntimeError, match="duplicate"):
        torch.ops.rectok_fast.unpatchify(torch.randn(1, 2, 12), 2, 3, 2, 2, torch.tensor([[3, 3]]))
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.rectok_fast.patchify(x, 2, torch.tensor([[0, 1]], dtype=torch.int32))


def test_unpatchify_ids_writes_every_element_once():
    """unpatchify with ids_keep (patchify's backward) builds the image from an inverse map, with no
    zero-filled buffer underneath: cells nobody kept must still come out as exact zeros, however dirty
    the memory it gets."""
    B, C, gh, gw, p = 3, 3, 4, 5, 4
    N = gh * gw
    for k in (0, 1, 7, N):
        ids = _ids(B, N, k)
        t = torch.randn(B, k, C * p * p)
        for _ in range(3):  # recycle freed blocks full of NaN into the allocation
            junk = torch.full((B, C, gh * p, gw * p), float("nan"))
            del junk
            img = torch.ops.rectok_fast.unpatchify(t, p, C, gh, gw, ids)
            assert torch.equal(img, _ref_unpatchify_ids(t, p, C, gh, gw, ids)), k


def test_raw_ops_check_devices_and_sizes():
    """CPU data with meta ids used to dispatch to the fake and return uninitialised memory; the raw ops
    now refuse mixed devices.  Size products that overflow int64 are errors, also for empty inputs."""
    x = torch.randn(2, 3, 8, 8)
    meta_ids = torch.zeros(2, 2, dtype=torch.long, device="meta")
    with pytest.raises(RuntimeError, match="ids_keep is on meta but images is on cpu"):
        torch.ops.rectok_fast.patchify(x, 4, meta_ids)
    with pytest.raises(RuntimeError, match="ids_keep is on meta but tokens is on cpu"):
        torch.ops.rectok_fast.unpatchify(torch.randn(2, 2, 48), 4, 3, 2, 2, meta_ids)
    with pytest.raises(RuntimeError, match="ids_keep is on cpu but images is on meta"):
        torch.ops.rectok_fast.patchify(x.to("meta"), 4, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="overflows int64"):
        torch.ops.rectok_fast.patchify(torch.zeros(0, 3, 0, 0), 2**40, None)
    with pytest.raises(RuntimeError, match="overflows int64"):
        torch.ops.rectok_fast.unpatchify(torch.zeros(0, 0, 0), 2**40, 3, 0, 0, None)
    # an empty image with a huge grid: no n_cells-sized scratch, an empty result
    out = torch.ops.rectok_fast.patchify(torch.zeros(0, 1, 2**15, 2**15), 1, torch.zeros(0, 4, dtype=torch.long))
    assert out.shape == (0, 4, 1)


@pytest.mark.parametrize("with_ids", [False, True])
def test_zero_channels_forward_and_backward(with_ids):
    """C = 0: patchify gives (B, T, 0) tokens and its backward (unpatchify with channels = 0) an
    empty image gradient, as the reference (it used to fail on the C++ path)."""
    x = torch.zeros(2, 0, 8, 8, requires_grad=True)
    ids = _ids(2, 4, 3) if with_ids else None
    out = patchify(x, 4, ids, backend="cpp")
    assert out.shape == (2, 3 if with_ids else 4, 0)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == x.shape
    xr = x.detach().requires_grad_()
    (gr,) = torch.autograd.grad(ref_patchify(xr, 4, ids).sum(), xr)
    assert torch.equal(g, gr)


# ---------------------------------------------------------------------------------------------
# CUDA kernels against the CPU kernels (run on a GPU machine)
# ---------------------------------------------------------------------------------------------
cuda_kernels = pytest.mark.skipif(not patch_mod.HAS_CUDA_KERNELS, reason="extension built without CUDA kernels")


@pytest.mark.cuda_only
@cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES + [(2, 3, 16, 16, 16), (1, 3, 5, 7, 14)])
def test_cuda_matches_cpu(shape, dtype):
    B, C, gh, gw, p = shape
    N = gh * gw
    x = torch.randn(B, C, gh * p, gw * p).to(dtype)
    xc = x.cuda()
    out = patchify(xc, p, backend="cpp")
    assert rectok_fast.last_backend("patchify") == "cpp"
    assert torch.equal(out.cpu(), patchify(x, p, backend="cpp"))
    assert torch.equal(unpatchify(out, p, C, (gh, gw), backend="cpp").cpu(), x)
    for k in (0, max(1, N // 2), N):
        ids = _ids(B, N, k)
        t = patchify(xc, p, ids.cuda(), backend="cpp")
        assert torch.equal(t.cpu(), ref_patchify(x, p, ids))
        img = unpatchify(t, p, C, (gh, gw), ids_keep=ids.cuda(), backend="cpp")
        assert torch.equal(img.cpu(), _ref_unpatchify_ids(t.cpu(), p, C, gh, gw, ids))


@pytest.mark.cuda_only
@cuda_kernels
def test_cuda_misaligned_and_non_contiguous():
    # an offset view breaks 16-byte alignment: the launcher must pick a narrower vector width
    buf = torch.randn(1 + 2 * 3 * 32 * 32, device="cuda")
    x = buf[1:].view(2, 3, 32, 32)
    torch.testing.assert_close(patchify(x, 16, backend="cpp"), ref_patchify(x, 16), rtol=0, atol=0)
    xt = torch.randn(2, 32, 3, 32, device="cuda").permute(0, 2, 1, 3)
    torch.testing.assert_close(patchify(xt, 8, backend="cpp"), ref_patchify(xt, 8), rtol=0, atol=0)


@pytest.mark.cuda_only
@pytest.mark.gpu_smoke  # gpu_suite.sh's GPU test step: one case per op
@cuda_kernels
def test_cuda_grad_opcheck_and_range_check():
    x = torch.randn(2, 3, 8, 12, device="cuda", dtype=torch.float64, requires_grad=True)
    ids = _ids(2, 6, 3, "cuda")
    assert torch.autograd.gradcheck(lambda a: patchify(a, 4, ids, backend="cpp"), (x,))
    torch.library.opcheck(torch.ops.rectok_fast.patchify.default, (x, 4, ids))
    torch.library.opcheck(
        torch.ops.rectok_fast.unpatchify.default, (torch.randn(2, 3, 48, device="cuda"), 4, 3, 2, 3, ids)
    )
    with pytest.raises(ValueError, match="ids_keep"):
        patchify(x, 4, torch.tensor([[0, 6]], device="cuda").expand(2, 2))
    # a direct op call with a bad id neither crashes nor reads out of bounds: that token is zero
    bad = torch.tensor([[0, 99]], device="cuda").expand(2, 2).contiguous()
    out = torch.ops.rectok_fast.patchify(x.detach(), 4, bad)
    assert (out[:, 1] == 0).all()
    # unpatchify through the inverse map: out-of-range ids dropped, uncovered cells exactly zero
    # (no zero-filled buffer underneath: the caching allocator hands back the NaN block)
    junk = torch.full((2, 3, 8, 12), float("nan"), device="cuda", dtype=torch.float64)
    del junk
    img = torch.ops.rectok_fast.unpatchify(out, 4, 3, 2, 3, bad)
    want = torch.zeros(2, 3, 8, 12, device="cuda", dtype=torch.float64)
    want[:, :, :4, :4] = x.detach()[:, :, :4, :4]
    assert torch.equal(img, want)
    torch.cuda.synchronize()
