"""gather_tokens / restore_tokens: Triton kernels (GPU, or the interpreter on CPU) vs the reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_fa_rule, max_err, reference_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rectok_fast
from rectok_fast.ops.tokens import (
    gather_tokens,
    gather_tokens_bwd,
    gather_tokens_fwd,
    restore_tokens,
    restore_tokens_bwd,
    restore_tokens_fwd,
)
from rectok_fast.reference import tokens as ref


def _keep_ids(B: int, N: int, K: int, device, dtype=torch.int64) -> torch.Tensor:
    return torch.stack([torch.randperm(N)[:K] for _ in range(B)]).to(device=device, dtype=dtype)


def _restore_ids(B: int, N: int, device, dtype=torch.int64) -> torch.Tensor:
    shuffle = torch.stack([torch.randperm(N) for _ in range(B)])
    return torch.argsort(shuffle, dim=1).to(device=device, dtype=dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _grads(out: torch.Tensor, inputs, grad_out: torch.Tensor):
    return torch.autograd.grad(out, inputs, grad_out)


def _assert_close(a: torch.Tensor, b: torch.Tensor, exact: bool, what: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    if exact:
        assert torch.equal(a, b), f"{what}: max err {max_err(a, b):.3e} (exact equality expected)"
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=what)


# ----------------------------------------------------------------------------- gather

# (B, N, K, D): odd N and D, K = 0 (empty) and K = N (full)
GATHER_SHAPES = [
    (2, 7, 3, 3),
    (1, 1, 1, 129),
    (3, 1, 1, 3),
    (2, 257, 64, 3),
    (2, 7, 7, 1024),
    (1, 257, 257, 5),
    (2, 7, 0, 5),
]


@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("shape", GATHER_SHAPES)
def test_gather_fp32_matches_reference(kernel_device, shape, with_pos):
    B, N, K, D = shape
    x = _leaf(torch.randn(B, N, D, device=kernel_device))
    pos = _leaf(torch.randn(N, D, device=kernel_device)) if with_pos else None
    ids = _keep_ids(B, N, K, kernel_device)
    out = gather_tokens(x, ids, pos, backend="triton")
    assert rectok_fast.last_backend("gather_tokens") == "triton"
    exp = ref.gather_tokens(x, ids, pos)
    _assert_close(out, exp, exact=True, what="out")  # a copy, or one add: bitwise equal

    g = torch.randn_like(out)
    inputs = (x,) if pos is None else (x, pos)
    got, want = _grads(out, inputs, g), _grads(exp, inputs, g)
    _assert_close(got[0], want[0], exact=True, what="grad_x")  # unique ids: a scatter, no sums
    if pos is not None:
        _assert_close(got[1], want[1], exact=B <= 2, what="grad_pos")  # sum over the batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 7, 3, 129), (2, 257, 100, 3), (3, 7, 7, 1024)])
def test_gather_low_precision_fa_rule(kernel_device, shape, dtype):
    B, N, K, D = shape
    x32 = torch.randn(B, N, D, device=kernel_device)
    pos32 = torch.randn(1, N, D, device=kernel_device)
    ids = _keep_ids(B, N, K, kernel_device)
    x, pos = _leaf(x32.to(dtype)), _leaf(pos32.to(dtype))
    xr, posr = _leaf(x32.to(dtype)), _leaf(pos32.to(dtype))
    xf, posf = _leaf(x.detach().float()), _leaf(pos.detach().float())

    out = gather_tokens(x, ids, pos, backend="triton")
    out_ref = ref.gather_tokens(xr, ids, posr)
    out_f = ref.gather_tokens(xf, ids, posf)
    assert out.dtype == dtype
    assert_fa_rule(out, out_ref, out_f)
    # one rounding of an exact fp32 sum, like PyTorch's own half-precision add
    assert torch.equal(out, out_ref)

    g = torch.randn(out.shape, device=kernel_device).to(dtype)
    got = _grads(out, (x, pos), g)
    same = _grads(out_ref, (xr, posr), g)
    full = _grads(out_f, (xf, posf), g.float())
    for a, b, c in zip(got, same, full):
        assert a.dtype == dtype
        assert_fa_rule(a, b, c, factor=3.0)


@pytest.mark.parametrize("x_kind", ["table_2d", "table_1nd"])
@pytest.mark.parametrize("with_pos", [False, True])
def test_gather_shared_table(kernel_device, x_kind, with_pos):
    """A table shared by the batch (RoPE rows): out (B, K, D); its gradient sums over the batch."""
    B, N, K, D = 3, 13, 6, 9
    table = torch.randn(N, D, device=kernel_device)
    x = _leaf(table if x_kind == "table_2d" else table.unsqueeze(0))
    pos = _leaf(torch.randn(1, N, D, device=kernel_device)) if with_pos else None
    # overlapping ids across the batch so that the table gradient really accumulates
    ids = torch.stack([torch.randperm(8)[:K] for _ in range(B)]).to(kernel_device)
    out = gather_tokens(x, ids, pos, backend="triton")
    exp = ref.gather_tokens(x, ids, pos)
    assert out.shape == (B, K, D)
    _assert_close(out, exp, exact=True, what="out")
    g = torch.randn_like(out)
    inputs = (x,) if pos is None else (x, pos)
    for a, b in zip(_grads(out, inputs, g), _grads(exp, inputs, g)):
        _assert_close(a, b, exact=False, what="grad")


@pytest.mark.gpu_smoke  # gpu_suite.sh's GPU test step: one case per op
def test_gather_duplicate_ids_accumulate(kernel_device):
    B, N, K, D = 2, 5, 12, 7
    x = _leaf(torch.randn(B, N, D, device=kernel_device))
    ids = torch.randint(0, N, (B, K), device=kernel_device)
    out = gather_tokens(x, ids, backend="triton")
    exp = ref.gather_tokens(x, ids)
    _assert_close(out, exp, exact=True, what="out")
    g = torch.randn_like(out)
    _assert_close(_grads(out, (x,), g)[0], _grads(exp, (x,), g)[0], exact=False, what="grad_x")


def test_gather_backward_is_deterministic(kernel_device):
    B, N, K, D = 4, 9, 9, 33
    table = _leaf(torch.randn(N, D, device=kernel_device))
    ids = torch.randint(0, N, (B, K), device=kernel_device)
    g = torch.randn(B, K, D, device=kernel_device)
    runs = [_grads(gather_tokens(table, ids, backend="triton"), (table,), g)[0] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    # and equals the fp64 sum in the same order, rounded once
    want = torch.zeros(N, D, dtype=torch.float64, device=kernel_device)
    want.index_add_(0, ids.reshape(-1), g.reshape(-1, D).double())
    torch.testing.assert_close(runs[0], want.float(), rtol=1e-6, atol=1e-6)


def test_gather_noncontiguous_int32_mixed_dtype(kernel_device):
    B, N, K, D = 2, 11, 4, 6
    x = _leaf(torch.randn(B, D, 2 * N, device=kernel_device))
    x_view = x.transpose(1, 2)[:, ::2]  # (B, N, D), strides (2N·D, 2, 2N)
    pos = _leaf(torch.randn(D, N, device=kernel_device))
    pos_view = pos.t()  # (N, D), column-major
    ids = _keep_ids(B, N, 2 * K, kernel_device, torch.int32)[:, ::2]  # (B, K) int32, stride 2
    assert not (x_view.is_contiguous() or pos_view.is_contiguous() or ids.is_contiguous())
    out = gather_tokens(x_view, ids, pos_view, backend="triton")
    exp = ref.gather_tokens(x_view, ids, pos_view)
    _assert_close(out, exp, exact=True, what="out")
    # a non-contiguous (expanded) upstream gradient
    g = torch.randn(1, 1, D, device=kernel_device).expand(B, K, D)
    for a, b in zip(_grads(out, (x, pos), g), _grads(exp, (x, pos), g)):
        _assert_close(a, b, exact=True, what="grad")

    # bf16 tokens + fp32 position table: promoted to fp32 like the reference
    xb = _leaf(torch.randn(B, N, D, device=kernel_device).to(torch.bfloat16))
    out = gather_tokens(xb, ids, pos_view, backend="triton")
    exp = ref.gather_tokens(xb, ids, pos_view)
    _assert_close(out, exp, exact=True, what="out mixed")
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, (xb, pos), g), _grads(exp, (xb, pos), g)):
        _assert_close(a, b, exact=True, what="grad mixed")


def test_gather_rope_rows_golden(kernel_device):
    """The tokenizer gathers the RoPE rows of the kept tokens: gather_tokens(table, ids) == table[ids]."""
    g = torch.load(reference_file("golden_rectok_tiny.pt"), map_location="cpu", weights_only=True)["outputs"]
    table, ids = g["rope_encoder"].to(kernel_device), g["ids_keep"].to(kernel_device)  # (N, 2·D), (B, K)
    out = gather_tokens(table, ids, backend="triton")
    assert out.shape == (ids.shape[0], ids.shape[1], table.shape[1])
    for b in range(ids.shape[0]):
        assert torch.equal(out[b], table[ids[b]])


# ----------------------------------------------------------------------------- restore

# (B, N, K, D)
RESTORE_SHAPES = [
    (2, 7, 3, 3),
    (1, 1, 1, 129),
    (2, 1, 0, 4),
    (2, 257, 64, 3),
    (2, 7, 7, 1024),
    (3, 7, 0, 5),
    (1, 257, 257, 3),
]


@pytest.mark.parametrize("mask_shape", ["d", "11d"])
@pytest.mark.parametrize("with_pos", [False, True])
@pytest.mark.parametrize("shape", RESTORE_SHAPES)
def test_restore_fp32_matches_reference(kernel_device, shape, with_pos, mask_shape):
    B, N, K, D = shape
    vis = _leaf(torch.randn(B, K, D, device=kernel_device))
    mt = _leaf(
        torch.randn(D, device=kernel_device) if mask_shape == "d" else torch.randn(1, 1, D, device=kernel_device)
    )
    pos = _leaf(torch.randn(1, N, D, device=kernel_device)) if with_pos else None
    ids = _restore_ids(B, N, kernel_device)
    out = restore_tokens(vis, ids, mt, pos, backend="triton")
    assert rectok_fast.last_backend("restore_tokens") == "triton"
    exp = ref.restore_tokens(vis, ids, mt, pos)
    _assert_close(out, exp, exact=True, what="out")

    g = torch.randn_like(out)
    inputs = (vis, mt) if pos is None else (vis, mt, pos)
    got, want = _grads(out, inputs, g), _grads(exp, inputs, g)
    _assert_close(got[0], want[0], exact=True, what="grad_visible")  # a permutation: pure copies
    _assert_close(got[1], want[1], exact=False, what="grad_mask_token")  # sum over masked positions
    if pos is not None:
        _assert_close(got[2], want[2], exact=B <= 2, what="grad_pos")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 7, 3, 129), (3, 257, 64, 3), (2, 7, 2, 1024)])
def test_restore_low_precision_fa_rule(kernel_device, shape, dtype):
    B, N, K, D = shape
    v32, m32, p32 = (torch.randn(s, device=kernel_device) for s in ((B, K, D), (D,), (N, D)))
    ids = _restore_ids(B, N, kernel_device)
    vis, mt, pos = (_leaf(t.to(dtype)) for t in (v32, m32, p32))
    visr, mtr, posr = (_leaf(t.to(dtype)) for t in (v32, m32, p32))
    visf, mtf, posf = (_leaf(t.detach().float()) for t in (vis, mt, pos))
    out = restore_tokens(vis, ids, mt, pos, backend="triton")
    out_ref = ref.restore_tokens(visr, ids, mtr, posr)
    out_f = ref.restore_tokens(visf, ids, mtf, posf)
    assert out.dtype == dtype
    assert_fa_rule(out, out_ref, out_f)
    assert torch.equal(out, out_ref)

    g = torch.randn(out.shape, device=kernel_device).to(dtype)
    got = _grads(out, (vis, mt, pos), g)
    same = _grads(out_ref, (visr, mtr, posr), g)
    full = _grads(out_f, (visf, mtf, posf), g.float())
    for a, b, c in zip(got, same, full):
        assert a.dtype == dtype
        assert_fa_rule(a, b, c, factor=3.0)


@pytest.mark.gpu_smoke  # gpu_suite.sh's GPU test step: one case per op
def test_restore_noncontiguous_int32_mixed_dtype(kernel_device):
    B, N, K, D = 3, 10, 4, 5
    vis = _leaf(torch.randn(B, D, 2 * K, device=kernel_device))
    vis_view = vis.transpose(1, 2)[:, 1::2]  # (B, K, D)
    mt = _leaf(torch.randn(D, 3, device=kernel_device))
    mt_view = mt[:, 1]  # (D,), stride 3
    pos = _leaf(torch.randn(D, N, device=kernel_device))
    pos_view = pos.t()
    ids = _restore_ids(B, N, kernel_device, torch.int32).t().contiguous().t()  # (B, N), column-major
    assert not (vis_view.is_contiguous() or mt_view.is_contiguous() or ids.is_contiguous())
    out = restore_tokens(vis_view, ids, mt_view, pos_view, backend="triton")
    exp = ref.restore_tokens(vis_view, ids, mt_view, pos_view)
    _assert_close(out, exp, exact=True, what="out")
    g = torch.randn(B, 1, D, device=kernel_device).expand(B, N, D)
    got, want = _grads(out, (vis, mt, pos), g), _grads(exp, (vis, mt, pos), g)
    _assert_close(got[0], want[0], exact=True, what="grad_visible")
    _assert_close(got[1], want[1], exact=False, what="grad_mask_token")
    _assert_close(got[2], want[2], exact=False, what="grad_pos")

    # bf16 visible tokens, fp32 mask token and position embedding (the usual AMP case)
    vb = _leaf(torch.randn(B, K, D, device=kernel_device).to(torch.bfloat16))
    out = restore_tokens(vb, ids, mt_view, pos_view, backend="triton")
    exp = ref.restore_tokens(vb, ids, mt_view, pos_view)
    _assert_close(out, exp, exact=True, what="out mixed")
    g = torch.randn_like(out)
    got, want = _grads(out, (vb, mt, pos), g), _grads(exp, (vb, mt, pos), g)
    _assert_close(got[0], want[0], exact=True, what="grad_visible mixed")
    # the reference sums the mask-token gradient in bf16; ours in fp32
    want_mt = torch.zeros(D, dtype=torch.float64, device=kernel_device)
    masked = ids >= K
    want_mt += g.double()[masked].sum(0)
    torch.testing.assert_close(got[1][:, 1].double(), want_mt, rtol=1e-5, atol=1e-5)
    _assert_close(got[2], want[2], exact=False, what="grad_pos mixed")


def test_restore_only_some_inputs_require_grad(kernel_device):
    B, N, K, D = 2, 7, 3, 4
    vis = torch.randn(B, K, D, device=kernel_device)
    mt = _leaf(torch.randn(D, device=kernel_device))
    ids = _restore_ids(B, N, kernel_device)
    out = restore_tokens(vis, ids, mt, backend="triton")
    (g_mt,) = torch.autograd.grad(out.sum(), (mt,))
    torch.testing.assert_close(g_mt, torch.full((D,), float(B * (N - K)), device=kernel_device))


@pytest.mark.parametrize("shape", [(2, 7, 3, 5), (2, 150, 40, 3)])
def test_restore_registered_op_any_ids_matches_reference(kernel_device, shape):
    """Not a permutation (checks off / under compile): duplicated ids, ids no position takes and
    out-of-range ids give the reference's forward and backward (grad_visible sums duplicates, is
    zero for visible tokens nobody takes), deterministically; rows longer than one link tile."""
    B, N, K, D = shape
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(-2, K + 3, (B, N), generator=gen).to(kernel_device)
    ids[:, : N // 3] = ids[:, N // 3 : 2 * (N // 3)]  # many repeats, across tiles for N = 150
    vis = _leaf(torch.randn(B, K, D, dtype=torch.float64, device=kernel_device))
    mt = _leaf(torch.randn(D, dtype=torch.float64, device=kernel_device))
    pos = _leaf(torch.randn(N, D, dtype=torch.float64, device=kernel_device))
    out = restore_tokens_fwd(vis, ids, mt, pos)
    safe = torch.where((ids >= 0) & (ids < K), ids, K)  # the reference gathers only ids in [0, N)
    exp = ref.restore_tokens(vis, safe, mt, pos)
    torch.testing.assert_close(out, exp, rtol=0, atol=0)
    g = torch.randn(B, N, D, dtype=torch.float64, device=kernel_device)
    got, want = _grads(out, (vis, mt, pos), g), _grads(exp, (vis, mt, pos), g)
    for a, b, what in zip(got, want, ("visible", "mask_token", "pos")):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=what)
    unused = torch.ones(B, K, dtype=torch.bool, device=kernel_device)
    for b in range(B):
        unused[b, safe[b][safe[b] < K]] = False
    assert unused.any() and not got[0][unused].any()  # rows nobody takes are written as zeros
    again = _grads(restore_tokens_fwd(vis, ids, mt, pos), (vis, mt, pos), g)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.parametrize("L, R", [(6, 3), (6, 6), (13, 40), (300, 256), (64, 1)])
def test_links_kernel_matches_torch_construction(kernel_device, L, R):
    """token_links_kernel (one program sorts a row) == the torch.sort construction (used past
    _MAX_SORT_L): FIRST, NEXT and FLAGS for permutations, repeats (also among ids without a
    destination), ids without a destination and destinations without an id."""
    from rectok_fast.ops.tokens import _links, _links_torch

    gen = torch.Generator().manual_seed(L * 1000 + R)
    rows = [
        torch.randperm(L, generator=gen),  # distinct; a permutation of 0..R-1 only if L == R
        torch.randint(-1, R + 2, (L,), generator=gen),
        torch.where(torch.arange(L) < 2, R + 1, torch.randperm(L, generator=gen)),  # repeats beyond R
        torch.randint(0, max(1, R // 2), (L,), generator=gen),
    ]
    ids = torch.stack(rows).to(kernel_device)
    got, want = _links(ids, R), _links_torch(ids, R)
    for a, b, what in zip(got, want, ("FIRST", "NEXT", "FLAGS")):
        assert torch.equal(a, b), what
    perm = torch.stack([torch.randperm(R, generator=gen) for _ in range(2)]).to(kernel_device)
    first, nxt, flags = _links(perm, R)
    assert not flags.any() and (nxt == -1).all()
    assert torch.equal(first.long(), torch.argsort(perm, dim=1))  # the inverse permutation


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_restore_rejects_non_permutation(kernel_device, backend, monkeypatch):
    """Eager functionals refuse an ids_restore row that is not a permutation (in range but repeated);
    with the checks off the Triton path still equals the reference, gradients included."""
    B, N, K, D = 2, 6, 3, 4
    ids = _restore_ids(B, N, kernel_device)
    ids[1, 0] = ids[1, 1]  # in range, one id twice, one missing
    vis = _leaf(torch.randn(B, K, D, device=kernel_device))
    mt = _leaf(torch.randn(D, device=kernel_device))
    with pytest.raises(ValueError, match=r"`ids_restore` must hold a permutation of 0..5 in every row; row 1"):
        restore_tokens(vis, ids, mt, backend=backend)
    monkeypatch.setenv("RECTOK_FAST_CHECK_INDICES", "0")
    out = restore_tokens(vis, ids, mt, backend=backend)
    exp = ref.restore_tokens(vis, ids, mt)
    torch.testing.assert_close(out, exp, rtol=0, atol=0)
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, (vis, mt), g), _grads(exp, (vis, mt), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op", ["gather_shared", "gather_per_batch_pos", "restore"])
def test_batch_group_partials(kernel_device, op, monkeypatch):
    """Several batch groups (the last one short): the fp32 partials summed in a fixed order give the
    fp64 reference and the same bits on every run."""
    import rectok_fast.ops.tokens as tok

    monkeypatch.setattr(tok, "_MIN_ROWS_PER_GROUP", 2)
    B, N, K, D = 7, 9, 5, 6
    assert triton_groups(tok, B, N, D) == 3
    pos = _leaf(torch.randn(N, D, device=kernel_device))
    if op == "restore":
        ids = _restore_ids(B, N, kernel_device)
        vis, mt = _leaf(torch.randn(B, K, D, device=kernel_device)), _leaf(torch.randn(D, device=kernel_device))
        inputs = (vis, mt, pos)
        run = lambda: restore_tokens(vis, ids, mt, pos, backend="triton")  # noqa: E731
        ref_fn = lambda v, m, p: ref.restore_tokens(v, ids, m, p)  # noqa: E731
    else:
        ids = torch.randint(0, N, (B, K), device=kernel_device)  # repeats within and across rows
        x = _leaf(torch.randn((N, D) if op == "gather_shared" else (B, N, D), device=kernel_device))
        inputs = (x, pos)
        run = lambda: gather_tokens(x, ids, pos, backend="triton")  # noqa: E731
        ref_fn = lambda xx, p: ref.gather_tokens(xx, ids, p)  # noqa: E731
    out = run()
    g = torch.randn_like(out)
    got = _grads(out, inputs, g)
    args64 = [a.detach().double().requires_grad_(True) for a in inputs]
    want = _grads(ref_fn(*args64), args64, g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    again = _grads(run(), inputs, g)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def triton_groups(tok, B: int, N: int, D: int) -> int:
    import triton

    tiles = triton.cdiv(N, tok._BLOCK_TOKENS) * triton.cdiv(D, tok._block_d(D, tok._BLOCK_D_BWD))
    return triton.cdiv(B, tok._batch_groups(B, tiles))


# ----------------------------------------------------------------------------- opcheck, gradcheck, compile


def _opcheck_cases(device):
    B, N, K, D = 2, 7, 3, 5
    x = torch.randn(B, N, D, device=device, requires_grad=True)
    table = torch.randn(N, D, device=device, requires_grad=True)
    pos = torch.randn(1, N, D, device=device, requires_grad=True)
    ids = _keep_ids(B, N, K, device)
    vis = torch.randn(B, K, D, device=device, requires_grad=True)
    mt = torch.randn(D, device=device, requires_grad=True)
    ids_r = _restore_ids(B, N, device, torch.int32)
    ids_dup = torch.tensor([[1, 1, 4], [6, 0, 6]], device=device)
    ids_r_dup = torch.tensor([[0, 2, 2, 5, 6, 0, 1]] * B, device=device)
    g = torch.randn(B, K, D, device=device)
    gr = torch.randn(B, N, D, device=device)
    return [
        (gather_tokens_fwd, (x, ids, pos)),
        (gather_tokens_fwd, (table, ids, None)),
        (gather_tokens_bwd, (g, ids, N, False, True, torch.float32, True, torch.float32)),
        (gather_tokens_bwd, (g, ids, N, True, True, torch.bfloat16, False, torch.float32)),
        (gather_tokens_bwd, (g, ids_dup, N, False, True, torch.float32, False, torch.float32)),
        (restore_tokens_fwd, (vis, ids_r, mt, pos)),
        (restore_tokens_fwd, (vis, ids_r, mt, None)),
        (restore_tokens_bwd, (gr, ids_r, K, torch.float32, torch.float32, True, torch.float32)),
        (restore_tokens_bwd, (gr, ids_r, K, torch.float32, torch.float32, False, torch.float32)),
        (restore_tokens_bwd, (gr, ids_r_dup, K, torch.float32, torch.float32, True, torch.float32)),
    ]


@pytest.mark.parametrize("case", range(10))
def test_opcheck(kernel_device, case):
    op, args = _opcheck_cases(kernel_device)[case]
    torch.library.opcheck(op, args)


def test_gradcheck_reference_fp64():
    B, N, K, D = 2, 5, 3, 3
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    ids = _keep_ids(B, N, K, "cpu")
    assert torch.autograd.gradcheck(lambda a, p: ref.gather_tokens(a, ids, p), (x, pos))
    vis = torch.randn(B, K, D, dtype=torch.float64, requires_grad=True)
    mt = torch.randn(D, dtype=torch.float64, requires_grad=True)
    ids_r = _restore_ids(B, N, "cpu")
    assert torch.autograd.gradcheck(lambda v, m, p: ref.restore_tokens(v, ids_r, m, p), (vis, mt, pos))


def test_gradcheck_kernels_fp64(kernel_device):
    """The fp64 kernel path (fp64 accumulation) against finite differences."""
    B, N, K, D = 2, 4, 2, 2
    table = torch.randn(N, D, dtype=torch.float64, device=kernel_device, requires_grad=True)
    pos = torch.randn(N, D, dtype=torch.float64, device=kernel_device, requires_grad=True)
    ids = torch.tensor([[1, 3], [3, 0]], device=kernel_device)
    assert torch.autograd.gradcheck(lambda a, p: gather_tokens(a, ids, p, backend="triton"), (table, pos))
    vis = torch.randn(B, K, D, dtype=torch.float64, device=kernel_device, requires_grad=True)
    mt = torch.randn(D, dtype=torch.float64, device=kernel_device, requires_grad=True)
    ids_r = _restore_ids(B, N, kernel_device)
    assert torch.autograd.gradcheck(lambda v, m, p: restore_tokens(v, ids_r, m, p, backend="triton"), (vis, mt, pos))


def test_torch_compile_fullgraph(kernel_device):
    """Both functionals, forward and backward, in one graph with no break; dynamic shapes exercise
    the fake implementations.  On CPU the aot_eager backend (inductor's C++ build takes ~30 s there
    and the ops are opaque to it anyway); inductor on a GPU."""
    torch._dynamo.reset()

    def f(x, ids, pos, mt, ids_r):
        vis = gather_tokens(x, ids, pos, backend="triton")
        return restore_tokens(vis * 2.0, ids_r, mt, pos, backend="triton")

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager" if kernel_device == "cpu" else "inductor")
    for B, N, K, D in [(2, 9, 4, 6), (3, 12, 5, 6)]:
        x = _leaf(torch.randn(B, N, D, device=kernel_device))
        pos = _leaf(torch.randn(N, D, device=kernel_device))
        mt = _leaf(torch.randn(D, device=kernel_device))
        ids = _keep_ids(B, N, K, kernel_device)
        ids_r = _restore_ids(B, N, kernel_device)
        out = cf(x, ids, pos, mt, ids_r)
        exp = ref.restore_tokens(ref.gather_tokens(x, ids, pos) * 2.0, ids_r, mt, pos)
        torch.testing.assert_close(out, exp, rtol=0, atol=0)
        g = torch.randn_like(out)
        for a, b in zip(_grads(out, (x, pos, mt), g), _grads(exp, (x, pos, mt), g)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- backend selection, bad input


def test_auto_backend_and_reference_path(kernel_device):
    x = torch.randn(2, 5, 3, device=kernel_device)
    ids = _keep_ids(2, 5, 2, kernel_device)
    out = gather_tokens(x, ids)
    assert rectok_fast.last_backend("gather_tokens") == ("triton" if x.is_cuda else "reference")
    assert torch.equal(out, ref.gather_tokens(x, ids))
    gather_tokens(x, ids, backend="reference")
    assert rectok_fast.last_backend("gather_tokens") == "reference"
    with pytest.raises(ValueError, match="backend"):
        gather_tokens(x, ids, backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gather_bad_input(kernel_device, backend):
    dev = kernel_device
    x = torch.randn(2, 5, 3, device=dev)
    ids = _keep_ids(2, 5, 2, dev)
    cases = [
        (TypeError, "`x`", lambda: gather_tokens([1.0], ids, backend=backend)),
        (TypeError, "`x`", lambda: gather_tokens(x.long(), ids, backend=backend)),
        (TypeError, "`ids_keep`", lambda: gather_tokens(x, ids.float(), backend=backend)),
        (ValueError, "`ids_keep`", lambda: gather_tokens(x, ids[0], backend=backend)),
        (ValueError, "`x`", lambda: gather_tokens(x[0, 0], ids, backend=backend)),
        (ValueError, "`x`", lambda: gather_tokens(torch.randn(3, 5, 3, device=dev), ids, backend=backend)),
        (ValueError, "`pos`", lambda: gather_tokens(x, ids, torch.randn(5, 4, device=dev), backend=backend)),
        (ValueError, "`pos`", lambda: gather_tokens(x, ids, torch.randn(2, 5, 3, device=dev), backend=backend)),
        (
            TypeError,
            "`pos`",
            lambda: gather_tokens(x, ids, torch.ones(5, 3, dtype=torch.int64, device=dev), backend=backend),
        ),
        (ValueError, "`ids_keep`", lambda: gather_tokens(x, ids + 5, backend=backend)),
        (ValueError, "`ids_keep`", lambda: gather_tokens(x, ids - 3, backend=backend)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_restore_bad_input(kernel_device, backend):
    dev = kernel_device
    B, N, K, D = 2, 6, 2, 3
    vis = torch.randn(B, K, D, device=dev)
    mt = torch.randn(D, device=dev)
    ids = _restore_ids(B, N, dev)
    cases = [
        (TypeError, "`visible`", lambda: restore_tokens(vis.int(), ids, mt, backend=backend)),
        (ValueError, "`visible`", lambda: restore_tokens(vis[0], ids, mt, backend=backend)),
        (TypeError, "`ids_restore`", lambda: restore_tokens(vis, ids.double(), mt, backend=backend)),
        (ValueError, "`ids_restore`", lambda: restore_tokens(vis, ids[:1], mt, backend=backend)),
        (ValueError, "`ids_restore`", lambda: restore_tokens(vis, ids[:, :1], mt, backend=backend)),
        (ValueError, "`ids_restore`", lambda: restore_tokens(vis, ids + 1, mt, backend=backend)),
        (ValueError, "`mask_token`", lambda: restore_tokens(vis, ids, torch.randn(D + 1, device=dev), backend=backend)),
        (ValueError, "`mask_token`", lambda: restore_tokens(vis, ids, torch.randn(2, D, device=dev), backend=backend)),
        (TypeError, "`mask_token`", lambda: restore_tokens(vis, ids, mt.long(), backend=backend)),
        (ValueError, "`pos`", lambda: restore_tokens(vis, ids, mt, torch.randn(N + 1, D, device=dev), backend=backend)),
    ]
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()


def test_registered_ops_are_memory_safe_for_out_of_range_ids(kernel_device):
    """The registered ops (what compiled graphs run) never check ids on the host: the kernels
    read an id outside [0, N) as a zero row (gather) or insert the mask token for an id outside
    [0, K) (restore), and the backwards send those rows' gradients nowhere."""
    dev = kernel_device
    B, N, K, D = 2, 5, 3, 3
    x = _leaf(torch.randn(B, N, D, device=dev))
    pos = _leaf(torch.randn(N, D, device=dev))
    ids = torch.tensor([[1, 5, -1], [-7, 4, 1000]], device=dev)
    valid = (ids >= 0) & (ids < N)
    out = gather_tokens_fwd(x, ids, pos)
    safe = torch.where(valid, ids, 0)
    expect = torch.where(valid.unsqueeze(-1), ref.gather_tokens(x, safe, pos), 0.0)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    g = torch.randn(B, K, D, device=dev)
    gx, gpos = _grads(out, (x, pos), g)
    gx_ref, gpos_ref = _grads(ref.gather_tokens(x, safe, pos), (x, pos), g * valid.unsqueeze(-1))
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gpos, gpos_ref)

    Kv = 2
    vis = _leaf(torch.randn(B, Kv, D, device=dev))
    mt = _leaf(torch.randn(D, device=dev))
    rid = torch.tensor([[0, -1, 2, 9, 1], [1, 0, -100, 4, 3]], device=dev)
    out = restore_tokens_fwd(vis, rid, mt, None)
    in_vis = (rid >= 0) & (rid < Kv)
    expect = ref.restore_tokens(vis, torch.where(in_vis, rid, Kv), mt)  # Kv: a masked slot
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    g = torch.randn(B, N, D, device=dev)
    gvis, gmt = _grads(out, (vis, mt), g)
    gvis_ref, gmt_ref = _grads(expect, (vis, mt), g)
    torch.testing.assert_close(gvis, gvis_ref)
    torch.testing.assert_close(gmt, gmt_ref)


def test_eager_index_check_can_be_turned_off(kernel_device, monkeypatch):
    """RECTOK_FAST_CHECK_INDICES=0 skips the eager (host-syncing) range check of the functionals."""
    x = torch.randn(2, 5, 3, device=kernel_device)
    ids = torch.tensor([[0, 5], [6, 1]], device=kernel_device)
    with pytest.raises(ValueError, match="`ids_keep`"):
        gather_tokens(x, ids, backend="triton")
    monkeypatch.setenv("RECTOK_FAST_CHECK_INDICES", "0")
    out = gather_tokens(x, ids, backend="triton")
    assert torch.equal(out[0, 0], x[0, 0]) and torch.equal(out[1, 1], x[1, 1])
    assert not out[0, 1].any() and not out[1, 0].any()
    vis, mt = torch.randn(2, 2, 3, device=kernel_device), torch.randn(3, device=kernel_device)
    out = restore_tokens(vis, torch.tensor([[0, 7, 1], [-1, 1, 0]], device=kernel_device), mt, backend="triton")
    assert torch.equal(out[0, 1], mt) and torch.equal(out[1, 0], mt) and torch.equal(out[1, 2], vis[1, 0])


@pytest.mark.cuda_only
def test_registered_ops_do_not_sync_with_the_host():
    """Forward and backward of both ops through the registered ops under CUDA's sync debug mode."""
    dev = "cuda"
    B, N, K, D = 3, 64, 16, 96
    x = _leaf(torch.randn(B, N, D, device=dev))
    ids = _keep_ids(B, N, K, dev)
    vis = _leaf(torch.randn(B, K, D, device=dev))
    mt = _leaf(torch.randn(D, device=dev))
    pos = _leaf(torch.randn(N, D, device=dev))
    rid = _restore_ids(B, N, dev)
    gather_tokens_fwd(x, ids, None).sum().backward()  # warm up (compile the kernels)
    restore_tokens_fwd(vis, rid, mt, pos).sum().backward()
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gather_tokens_fwd(x, ids, None).sum().backward()
        restore_tokens_fwd(vis, rid, mt, pos).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------- fuzzing

_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(
    B=st.integers(1, 3),
    N=st.integers(1, 40),
    kfrac=st.floats(0.0, 1.0),
    D=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    ids_dtype=st.sampled_from([torch.int32, torch.int64]),
    with_pos=st.booleans(),
    shared=st.booleans(),
)
def test_fuzz_gather(kernel_device, B, N, kfrac, D, dtype, ids_dtype, with_pos, shared):
    K = int(round(kfrac * N))
    x = _leaf(torch.randn((N, D) if shared else (B, N, D), device=kernel_device).to(dtype))
    pos = _leaf(torch.randn(N, D, device=kernel_device).to(dtype)) if with_pos else None
    ids = _keep_ids(B, N, K, kernel_device, ids_dtype)
    out = gather_tokens(x, ids, pos, backend="triton")
    exp = ref.gather_tokens(x, ids, pos)
    _assert_close(out, exp, exact=True, what="out")
    g = torch.randn(out.shape, device=kernel_device).to(dtype)
    inputs = (x,) if pos is None else (x, pos)
    for a, b in zip(_grads(out, inputs, g), _grads(exp, inputs, g)):
        assert a.shape == b.shape and a.dtype == b.dtype
        tol = 1e-6 if dtype == torch.float32 else 2e-2 * max(1, B)
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@_SETTINGS
@given(
    B=st.integers(1, 3),
    N=st.integers(1, 40),
    kfrac=st.floats(0.0, 1.0),
    D=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    ids_dtype=st.sampled_from([torch.int32, torch.int64]),
    with_pos=st.booleans(),
)
def test_fuzz_restore(kernel_device, B, N, kfrac, D, dtype, ids_dtype, with_pos):
    K = int(round(kfrac * N))
    vis = _leaf(torch.randn(B, K, D, device=kernel_device).to(dtype))
    mt = _leaf(torch.randn(D, device=kernel_device).to(dtype))
    pos = _leaf(torch.randn(N, D, device=kernel_device).to(dtype)) if with_pos else None
    ids = _restore_ids(B, N, kernel_device, ids_dtype)
    out = restore_tokens(vis, ids, mt, pos, backend="triton")
    exp = ref.restore_tokens(vis, ids, mt, pos)
    _assert_close(out, exp, exact=True, what="out")
    g = torch.randn(out.shape, device=kernel_device).to(dtype)
    inputs = (vis, mt) if pos is None else (vis, mt, pos)
    got, want = _grads(out, inputs, g), _grads(exp, inputs, g)
    _assert_close(got[0], want[0], exact=True, what="grad_visible")
    # sums: ours in fp32 (one rounding), the reference's in the input dtype -> compare to fp64
    g64 = g.double()
    want_mt = g64[ids >= K].sum(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2 * (1 + want_mt.abs().max().item() if want_mt.numel() else 1)
    torch.testing.assert_close(got[1].double(), want_mt.to(got[1].dtype).double(), rtol=tol, atol=tol)
    if pos is not None:
        torch.testing.assert_close(got[2].double(), g64.sum(0).to(dtype).double(), rtol=tol, atol=tol)


@_SETTINGS
@given(
    B=st.integers(1, 9),
    N=st.integers(1, 70),
    kfrac=st.floats(0.0, 1.0),
    D=st.integers(1, 20),
    lo=st.integers(-3, 0),
    hi_extra=st.integers(-2, 3),
    with_pos=st.booleans(),
    shared=st.booleans(),
)
def test_fuzz_any_ids_registered_ops(kernel_device, B, N, kfrac, D, lo, hi_extra, with_pos, shared):
    """Registered ops (no host checks) with arbitrary ids, repeats and out-of-range values included:
    restore and gather, forward and every gradient, equal the reference in fp64 (gather / restore
    there see the out-of-range ids replaced by what the kernels do with them: a zero row, the mask
    token)."""
    K = int(round(kfrac * N))
    f64 = dict(device=kernel_device, dtype=torch.float64)
    pos = _leaf(torch.randn(N, D, **f64)) if with_pos else None
    # restore: ids in [lo, N + hi_extra)
    rid = torch.randint(lo, max(lo + 1, N + hi_extra), (B, N), device=kernel_device)
    vis, mt = _leaf(torch.randn(B, K, D, **f64)), _leaf(torch.randn(D, **f64))
    out = restore_tokens_fwd(vis, rid, mt, pos)
    exp = ref.restore_tokens(vis, torch.where((rid >= 0) & (rid < K), rid, K), mt, pos)
    torch.testing.assert_close(out, exp, rtol=0, atol=0)
    inputs = (vis, mt) if pos is None else (vis, mt, pos)
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, inputs, g), _grads(exp, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # gather: K ids in [lo, N + hi_extra)
    kid = torch.randint(lo, max(lo + 1, N + hi_extra), (B, K), device=kernel_device)
    x = _leaf(torch.randn((N, D) if shared else (B, N, D), **f64))
    valid = ((kid >= 0) & (kid < N)).unsqueeze(-1)
    out = gather_tokens_fwd(x, kid, pos)
    exp = torch.where(valid, ref.gather_tokens(x, torch.where(valid[..., 0], kid, 0), pos), 0.0)
    torch.testing.assert_close(out, exp, rtol=0, atol=0)
    inputs = (x,) if pos is None else (x, pos)
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, inputs, g), _grads(exp, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
