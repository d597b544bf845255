"""The drop-in modules of rectok_fast.nn.fused agree with the ops and references they wrap."""

from __future__ import annotations

import pytest
import torch

from rectok_fast import last_backend, reference
from rectok_fast.nn import CosineAlignLoss, FlowMatchingLoss, FlowNoiser, KLAlignLoss, MaskTokenRestore, TokenGather

BACKENDS = ["reference", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_noiser_train_and_eval(backend):
    B, N, C = 2, 16, 8
    moments = torch.randn(B, N, 2 * C, requires_grad=True)
    noiser = FlowNoiser(gamma=1.0, schedule="shift", backend=backend).train()
    out = noiser(moments)
    assert last_backend("posterior_flow") == backend
    assert out.z.shape == out.z_t.shape == (B, N, C) and out.t.shape == (B,) and out.kl.shape == (B,)
    # shift schedule with s = sqrt(N·C/4096) < 1 keeps t in (0, 1)
    assert bool(((out.t > 0) & (out.t < 1)).all())
    torch.testing.assert_close(out.kl, reference.gaussian_kl(moments[..., :C], moments[..., C:]), rtol=1e-5, atol=1e-5)
    # z_t is an interpolation between z and noise: not equal to z, and differentiable w.r.t. moments
    assert not torch.allclose(out.z_t, out.z)
    (out.z_t.sum() + out.kl.sum()).backward()
    assert moments.grad is not None and torch.isfinite(moments.grad).all()

    noiser.eval()
    ev = noiser(moments.detach())
    torch.testing.assert_close(ev.z, moments[..., :C].detach())
    torch.testing.assert_close(ev.z_t, moments[..., :C].detach())


def test_flow_noiser_rejects_bad_schedule():
    with pytest.raises(ValueError, match="schedule"):
        FlowNoiser(schedule="cosine")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_align_loss_targets(backend):
    B, N, D = 2, 9, 33
    pred, target = torch.randn(B, N, D), torch.randn(B, N, D)
    token_mask = torch.rand(B, N) < 0.4
    token_mask[0, 0], token_mask[0, 1] = True, False
    per_tok = 1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    expect = {
        "rec+align": per_tok.mean(),
        "reconstruction": per_tok[token_mask].mean(),
        "align": per_tok[~token_mask].mean(),
    }
    for name, value in expect.items():
        got = CosineAlignLoss(name, backend=backend)(pred, target, token_mask)
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
    # nothing masked: the reconstruction target contributes exactly zero
    zero = CosineAlignLoss("reconstruction", backend=backend)(pred, target, torch.zeros(B, N, dtype=torch.bool))
    assert zero.item() == 0.0
    with pytest.raises(ValueError, match="target"):
        CosineAlignLoss("l1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_align_module(backend):
    s, t = torch.randn(2, 5, 17, requires_grad=True), torch.randn(2, 5, 17)
    got = KLAlignLoss(temperature=2.0, backend=backend)(s, t)
    torch.testing.assert_close(got, reference.kl_align_loss(s, t, 2.0), rtol=1e-5, atol=1e-6)
    got.backward()
    assert s.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_token_restore_and_gather(backend):
    B, N, K, D = 2, 12, 5, 24
    ids_shuffle = torch.argsort(torch.rand(B, N), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.randn(B, N, D)
    vis = TokenGather(backend=backend)(x, ids_shuffle[:, :K])
    torch.testing.assert_close(vis, reference.gather_tokens(x, ids_shuffle[:, :K]))
    mod = MaskTokenRestore(D, num_tokens=N, backend=backend)
    out = mod(vis, ids_restore)
    ref = reference.restore_tokens(vis, ids_restore, mod.mask_token, mod.positional_embedding)
    torch.testing.assert_close(out, ref)
    # visible tokens land back at their original positions
    b = 1
    torch.testing.assert_close(out[b, ids_shuffle[b, :K]] - mod.positional_embedding[0, ids_shuffle[b, :K]], x[b, ids_shuffle[b, :K]])
    out.sum().backward()
    assert mod.mask_token.grad is not None and mod.mask_token.grad.abs().sum() > 0
    assert "num_tokens=12" in repr(mod)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_matching_module_regenerates_noise(backend):
    B = 3
    x1 = torch.randn(B, 4, 3, 3)
    t = torch.tensor([0.2, 0.5, 0.9])
    fm = FlowMatchingLoss(backend=backend)
    seed = 1234
    xt = fm.xt(x1, t, seed)
    # recover x0 from x_t = t·x1 + (1 − t)·x0, the perfect velocity is x1 − x0 → zero loss
    x0 = (xt - t.view(-1, 1, 1, 1) * x1) / (1 - t.view(-1, 1, 1, 1))
    assert fm(x1 - x0, x1, t, seed).item() < 1e-10
    assert fm(torch.zeros_like(x1), x1, t, seed).item() > 0.5
