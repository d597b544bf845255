"""The drop-in modules of rectok_fast.nn agree with the ops they wrap and with references written
from the peers' formulas (VA-VAE, REPA / REPA-E and SiT, l-DeTok, MAETok): fp32 and bf16, odd
shapes, the fused (Triton, interpreted on the CPU) and reference paths, fp64 gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_fa_rule

from rectok_fast import last_backend, reference, schedules
from rectok_fast.masking import Mask, random_masking
from rectok_fast.nn import (
    CosineAlignLoss,
    FlowMatchingLoss,
    FlowNoiser,
    GaussianPosterior,
    KLAlignLoss,
    MaskTokenRestore,
    TokenGather,
)
from rectok_fast.nn.fused import FM_PATHS, NOISE_MODES
from rectok_fast.ops import flow_noise

BACKENDS = ["reference", "triton"]


# ============================================================================= FlowNoiser


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_noiser_train_and_eval(backend):
    B, N, C = 2, 16, 8
    moments = torch.randn(B, N, 2 * C, requires_grad=True)
    noiser = FlowNoiser(gamma=1.0, schedule="shift", num_tokens=N, backend=backend).train()
    out = noiser(moments)
    assert last_backend("posterior_flow") == backend
    assert out.z.shape == out.z_t.shape == (B, N, C) and out.t.shape == (B,) and out.kl.shape == (B,)
    # shift schedule with s = sqrt(N·C/4096) < 1 keeps t in (0, 1)
    assert bool(((out.t > 0) & (out.t < 1)).all())
    torch.testing.assert_close(out.kl, reference.gaussian_kl(moments[..., :C], moments[..., C:]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.z_t, out.z)
    (out.z_t.sum() + out.kl.sum()).backward()
    assert moments.grad is not None and torch.isfinite(moments.grad).all()

    noiser.eval()
    ev = noiser(moments.detach())
    torch.testing.assert_close(ev.z, moments[..., :C].detach())
    assert ev.z_t is ev.z and ev.t is None


def test_flow_noiser_shift_uses_the_full_grid():
    """A masked encoder passes K < N tokens: the shift still comes from the full N (issue 13 §4)."""
    B, N, K, C = 5, 256, 64, 64
    moments = torch.randn(B, K, 2 * C)
    for kw in ({"num_tokens": N}, {"grid": 16}, {"grid": (8, 32)}):
        noiser = FlowNoiser(gamma=1.0, **kw, backend="reference").train()
        g = torch.Generator().manual_seed(3)
        out = noiser(moments, seed=1, generator=g)
        u = torch.rand(B, generator=torch.Generator().manual_seed(3))
        s = math.sqrt(N * C / 4096)  # = 2, the K tokens would give 1
        assert s == 2.0
        torch.testing.assert_close(out.t, schedules.shift_time(u, s), rtol=0, atol=0)
        assert not torch.allclose(out.t, u)
    with pytest.raises(ValueError, match="grid"):
        FlowNoiser(gamma=1.0, schedule="shift")  # no shift, no grid: it would guess from K


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_noiser_gamma_zero_draws_nothing(backend):
    B, N, C = 3, 7, 5
    moments = torch.randn(B, N, 2 * C, requires_grad=True)
    e1, e2 = torch.randn(B, N, C), torch.randn(B, N, C)
    noiser = FlowNoiser(gamma=0.0, backend=backend).train()
    state = torch.get_rng_state()
    out = noiser(moments, noise=(e1, e2))
    assert torch.equal(torch.get_rng_state(), state)  # no time (nor seed) drawn
    assert out.t is None and out.z_t is out.z
    mean, logvar = moments[..., :C], moments[..., C:].clamp(-30, 20)
    torch.testing.assert_close(out.z, mean + torch.exp(0.5 * logvar) * e1, rtol=1e-6, atol=1e-6)
    t = torch.rand(B)
    assert noiser(moments, t, noise=(e1, e2)).t is t  # a given t is passed through, unused


def _noise_ref(moments, t, gamma, e1, e2, mode, sample=True):
    C = moments.shape[-1] // 2
    mean, logvar = moments[..., :C], moments[..., C:].clamp(-30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * e1 if sample else mean
    tt = t.reshape(-1, 1, 1).to(z.dtype)
    return z, (z + tt * gamma * e2 if mode == "additive" else (1 - tt) * z + tt * gamma * e2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["interpolate", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_noiser_modes_against_formula(backend, mode, dtype):
    torch.manual_seed(0)
    B, N, C, gamma = 3, 13, 7, 3.0
    m32 = torch.randn(B, N, 2 * C)
    t32 = torch.rand(B)
    e1, e2 = torch.randn(B, N, C), torch.randn(B, N, C)
    moments = m32.to(dtype, copy=True).requires_grad_()
    t = t32.clone().requires_grad_()
    noiser = FlowNoiser(gamma=gamma, shift=1.0, mode=mode, backend=backend).train()
    out = noiser(moments, t, noise=(e1.to(dtype), e2.to(dtype)))
    assert out.z_t.dtype == dtype
    # fp32 reference from the formula, and the same-dtype reference for the error budget
    m_ref, t_ref = m32.clone().requires_grad_(), t32.clone().requires_grad_()
    z_ref, zt_ref = _noise_ref(m_ref, t_ref, gamma, e1, e2, mode)
    m_same = moments.detach().clone().requires_grad_()
    _, zt_same = _noise_ref(m_same, t32, gamma, e1.to(dtype), e2.to(dtype), mode)
    g = torch.randn(B, N, C)
    (out.z_t.float() * g).sum().backward()
    (zt_ref * g).sum().backward()
    (zt_same.float() * g).sum().backward()
    if dtype == torch.float32:
        torch.testing.assert_close(out.z_t, zt_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moments.grad, m_ref.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-4, atol=1e-4)
    else:  # flash-attention's rule: 2x (gradients 3x) the same-dtype reference's error, + one bf16 ulp
        assert_fa_rule(out.z_t, zt_same, zt_ref, atol=2.0**-8 * zt_ref.abs().max().item())
        assert_fa_rule(moments.grad, m_same.grad, m_ref.grad, 3.0, atol=2.0**-8 * m_ref.grad.abs().max().item())


def test_flow_noiser_additive_gradcheck_fp64():
    B, N, C = 2, 3, 2
    m = torch.randn(B, N, 2 * C, dtype=torch.float64, requires_grad=True)
    t = torch.rand(B, dtype=torch.float64, requires_grad=True)
    e1, e2 = torch.randn(B, N, C, dtype=torch.float64), torch.randn(B, N, C, dtype=torch.float64)
    noiser = FlowNoiser(gamma=2.0, shift=1.0, mode="additive", backend="reference").train()
    assert torch.autograd.gradcheck(lambda m, t: noiser(m, t, noise=(e1, e2)).z_t, (m, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_noiser_deterministic_latent_and_channels_first(backend):
    """l-DeTok: a plain latent z (no posterior); VA-VAE-style (B, 2C, H, W) moments with dim=1."""
    B, N, C = 2, 9, 6
    z = torch.randn(B, N, C, requires_grad=True)
    t, eps = torch.rand(B), torch.randn(B, N, C)
    noiser = FlowNoiser(gamma=3.0, schedule="uniform", posterior=False, backend=backend).train()
    out = noiser(z, t, noise=eps)
    assert out.kl is None
    torch.testing.assert_close(out.z, z)
    torch.testing.assert_close(out.z_t, (1 - t.view(-1, 1, 1)) * z + t.view(-1, 1, 1) * 3.0 * eps)
    out.z_t.sum().backward()
    torch.testing.assert_close(z.grad, (1 - t.view(-1, 1, 1)).expand(B, N, C))
    with pytest.raises(TypeError, match="noise"):
        FlowNoiser(gamma=1.0, shift=1.0).train()(torch.randn(B, N, 2 * C), t, noise=eps)
    ev = noiser.eval()(z)
    assert ev.z is z and ev.z_t is z and ev.kl is None  # eval: the latent as it is, no kernel

    H, W = 3, 5
    mom = torch.randn(B, 2 * C, H, W)
    e1, e2 = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    cf = FlowNoiser(gamma=1.0, shift=1.0, dim=1, backend=backend).train()(mom, t, noise=(e1, e2))
    z_ref, zt_ref = _noise_ref(
        mom.movedim(1, -1).flatten(1, 2),
        t,
        1.0,
        e1.movedim(1, -1).flatten(1, 2),
        e2.movedim(1, -1).flatten(1, 2),
        "interpolate",
    )
    assert cf.z.shape == cf.z_t.shape == (B, C, H, W)
    torch.testing.assert_close(cf.z.movedim(1, -1).flatten(1, 2), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cf.z_t.movedim(1, -1).flatten(1, 2), zt_ref, rtol=1e-5, atol=1e-5)


def test_flow_noiser_seeded_triton_matches_its_stream():
    """seed= on the fused path: the reference given the stream's own noise (flow_noise)."""
    B, N, C = 3, 5, 4
    moments, t = torch.randn(B, N, 2 * C), torch.rand(B)
    for mode in ("interpolate", "additive"):
        out = FlowNoiser(gamma=2.0, shift=1.0, mode=mode, backend="triton").train()(moments, t, seed=11)
        e1, e2 = flow_noise(11, (B, N, C))
        z_ref, zt_ref = _noise_ref(moments, t, 2.0, e1, e2, mode)
        torch.testing.assert_close(out.z, z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.z_t, zt_ref, rtol=1e-5, atol=1e-5)


# ============================================================================= CosineAlignLoss


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_align_loss_targets(backend):
    B, N, D = 2, 9, 33
    pred, target = torch.randn(B, N, D), torch.randn(B, N, D)
    token_mask = torch.rand(B, N) < 0.4
    token_mask[0, 0], token_mask[0, 1] = True, False
    per_tok = 1 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    expect = {
        "rec+align": per_tok.mean(),
        "reconstruction": per_tok[token_mask].mean(),
        "align": per_tok[~token_mask].mean(),
    }
    for name, value in expect.items():
        got = CosineAlignLoss(name, backend=backend)(pred, target, token_mask)
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6)
        neg = CosineAlignLoss(name, form="neg_cos", backend=backend)(pred, target, token_mask)
        torch.testing.assert_close(neg, value - 1, rtol=1e-5, atol=1e-6)
    # nothing masked: the reconstruction target contributes exactly zero (in both forms)
    none = torch.zeros(B, N, dtype=torch.bool)
    assert CosineAlignLoss("reconstruction", backend=backend)(pred, target, none).item() == 0.0
    assert CosineAlignLoss("reconstruction", form="neg_cos", backend=backend)(pred, target, none).item() == 0.0


def _repa_ref(zs, zts):
    """REPA's projection loss from its formula: −mean over encoders, samples and tokens of cos."""
    total = 0.0
    for z, zt in zip(zs, zts):
        total = total + (-(F.normalize(z.float(), dim=-1) * F.normalize(zt.float(), dim=-1)).sum(-1)).mean()
    return total / len(zs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_align_repa_several_encoders(backend, dtype):
    torch.manual_seed(1)
    B, N = 3, 7
    preds32 = [torch.randn(B, N, 17), torch.randn(B, N, 40)]
    tgts = [torch.randn(B, N, 17), torch.randn(B, N, 40)]
    preds = [p.to(dtype, copy=True).requires_grad_() for p in preds32]
    loss = CosineAlignLoss(form="neg_cos", backend=backend)(preds, [t.to(dtype) for t in tgts])
    refs = [p.clone().requires_grad_() for p in preds32]
    ref = _repa_ref(refs, tgts)
    loss.backward()
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    for p, r in zip(preds, refs):
        torch.testing.assert_close(p.grad.float(), r.grad, rtol=tol, atol=tol * r.grad.abs().max().item())
    with pytest.raises(ValueError, match="same length"):
        CosineAlignLoss()(preds, tgts[:1])
    with pytest.raises(ValueError, match="margin"):
        CosineAlignLoss(margin=0.1, form="neg_cos")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_align_channels_first_and_grad_target(backend):
    """VA-VAE's marginal cosine term: z' (B, D, H, W), f (B, H·W, D): mean relu(1 − m1 − cos(z'_ij, f_ij))."""
    B, D, H, W, m1 = 2, 19, 3, 5, 0.5
    zp = torch.randn(B, D, H, W, requires_grad=True)
    f = torch.randn(B, H * W, D, requires_grad=True)
    loss = CosineAlignLoss(margin=m1, dim=1, grad_target=True, backend=backend)(zp, f)
    zr, fr = zp.detach().clone().requires_grad_(), f.detach().clone().requires_grad_()
    ref = F.relu(1 - m1 - F.cosine_similarity(zr.flatten(2).transpose(1, 2), fr, dim=-1, eps=1e-8)).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(zp.grad, zr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(f.grad, fr.grad, rtol=1e-4, atol=1e-6)
    # without grad_target the teacher stays untouched
    f2 = f.detach().clone().requires_grad_()
    CosineAlignLoss(dim=1, backend=backend)(zp, f2).backward()
    assert f2.grad is None
    # both channels-first, and a spatial token mask
    tm = torch.rand(B, H, W) < 0.5
    both = CosineAlignLoss("reconstruction", dim=1, target_dim=1, backend=backend)(
        zp, f.detach().transpose(1, 2).reshape(B, D, H, W), tm
    )
    per = 1 - F.cosine_similarity(zp.detach().flatten(2).transpose(1, 2), f.detach(), dim=-1, eps=1e-8)
    torch.testing.assert_close(both, per[tm.flatten(1)].mean(), rtol=1e-5, atol=1e-6)


def test_cosine_align_gradcheck_fp64():
    p = torch.randn(2, 3, 5, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, 2, dtype=torch.float64, requires_grad=True)
    mod = CosineAlignLoss(form="neg_cos", dim=1, target_dim=1, grad_target=True, backend="reference")
    assert torch.autograd.gradcheck(lambda p, t: mod(p, t), (p, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_align_module(backend):
    s, t = torch.randn(2, 5, 17, requires_grad=True), torch.randn(2, 5, 17)
    got = KLAlignLoss(temperature=2.0, backend=backend)(s, t)
    torch.testing.assert_close(got, reference.kl_align_loss(s, t, 2.0), rtol=1e-5, atol=1e-6)
    got.backward()
    assert s.grad is not None


# ============================================================================= masking


def test_random_masking_plan():
    B, N = 4, 13
    m = random_masking(B, N, 0.75, generator=torch.Generator().manual_seed(0))
    K = int(N * (1 - 0.75))
    assert isinstance(m, Mask) and m.ids_keep.shape == (B, K) and m.ids_restore.shape == (B, N) and m.num_kept == K
    assert torch.equal(torch.sort(m.ids_restore, 1).values, torch.arange(N).expand(B, N))
    # token_mask: exactly N − K masked, and the kept ones are the ids_keep positions
    assert m.token_mask.dtype == torch.bool and (m.token_mask.sum(1) == N - K).all()
    for b in range(B):
        assert not m.token_mask[b, m.ids_keep[b]].any()
    again = random_masking(B, N, 0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.ids_keep, m.ids_keep) and torch.equal(again.ids_restore, m.ids_restore)
    assert random_masking(B, N, num_kept=N).token_mask.sum() == 0
    assert Mask(None, None).token_mask is None and Mask(None, None).num_kept is None
    for bad in ({"ratio": 1.0}, {"ratio": -0.1}, {"num_kept": 0}, {"num_kept": N + 1}, {}):
        with pytest.raises((ValueError, TypeError)):
            random_masking(B, N, **bad)


def test_rectok_uses_the_same_mask():
    from rectok_fast.models.rectok import Mask as RecTokMask
    from rectok_fast.models.rectok import RecTok, RecTokConfig

    assert RecTokMask is Mask
    cfg = RecTokConfig(
        img_size=64,
        token_channels=8,
        encoder=(48, 1, 2),
        decoder=(48, 1, 2),
        sem_decoder=(32, 1, 2),
        teachers={"tiny": 16},
    )
    m = RecTok(cfg)
    a = m.sample_mask(3, "cpu", num_kept=5, generator=torch.Generator().manual_seed(4))
    b = random_masking(3, m.config.num_tokens, num_kept=5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.ids_restore, b.ids_restore)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_token_restore_and_gather(backend):
    B, N, D = 2, 12, 24
    mask = random_masking(B, N, num_kept=5)
    K = mask.num_kept
    x = torch.randn(B, N, D)
    vis = TokenGather(backend=backend)(x, mask.ids_keep)
    torch.testing.assert_close(vis, reference.gather_tokens(x, mask.ids_keep))
    mod = MaskTokenRestore(D, num_tokens=N, backend=backend)
    out = mod(vis, mask.ids_restore)
    ref = reference.restore_tokens(vis, mask.ids_restore, mod.mask_token, mod.positional_embedding)
    torch.testing.assert_close(out, ref)
    b = 1
    keep = mask.ids_keep[b, :K]
    torch.testing.assert_close(out[b, keep] - mod.positional_embedding[0, keep], x[b, keep])
    # the masked positions hold mask token + pos
    tm = mask.token_mask
    torch.testing.assert_close(out[tm], (mod.mask_token[0] + mod.positional_embedding.expand(B, N, D))[tm])
    out.sum().backward()
    assert mod.mask_token.grad is not None and mod.mask_token.grad.abs().sum() > 0
    assert "num_tokens=12" in repr(mod)


def test_mask_token_restore_unmasked_and_replace():
    B, N, D = 3, 7, 10
    mod = MaskTokenRestore(D, num_tokens=N, backend="reference")
    x = torch.randn(B, N, D, requires_grad=True)
    ident = torch.arange(N).expand(B, N)
    torch.testing.assert_close(mod(x, None), mod(x, ident))  # ids_restore=None is the unmasked path
    torch.testing.assert_close(TokenGather()(x, None, mod.positional_embedding), x + mod.positional_embedding)
    tm = torch.rand(B, N) < 0.5
    tm[0, 0] = True
    out = mod.replace(x, tm)
    ref = torch.where(tm[..., None], mod.mask_token.expand(B, N, D), x) + mod.positional_embedding
    torch.testing.assert_close(out, ref)
    g = torch.randn(B, N, D)
    (out * g).sum().backward()
    torch.testing.assert_close(x.grad, g * (~tm[..., None]))
    torch.testing.assert_close(mod.mask_token.grad.reshape(D), g[tm].sum(0))
    torch.testing.assert_close(mod.replace(x, None), x + mod.positional_embedding)
    with pytest.raises(ValueError, match="token_mask"):
        mod.replace(x, tm[:, :-1])
    with pytest.raises(ValueError, match="tokens"):
        mod(torch.randn(B, N + 1, D), None)


# ============================================================================= GaussianPosterior


def _diag_gaussian_ref(moments, eps):
    """LDM / VA-VAE DiagonalGaussianDistribution from its formula, (B, 2C, H, W)."""
    mean, logvar = moments.chunk(2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    std, var = torch.exp(0.5 * logvar), torch.exp(logvar)
    kl = 0.5 * torch.sum(mean.pow(2) + var - 1.0 - logvar, dim=[1, 2, 3])
    return mean + std * eps, mean, kl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_posterior_channels_first(backend, dtype):
    torch.manual_seed(2)
    B, C, H, W = 2, 5, 3, 7
    m32 = torch.randn(B, 2 * C, H, W)
    eps = torch.randn(B, C, H, W)
    post = GaussianPosterior(dim=1, backend=backend)
    moments = m32.to(dtype, copy=True).requires_grad_()
    z = post.sample(moments, noise=eps.to(dtype))
    mr = m32.clone().requires_grad_()
    z_ref, mean_ref, kl_ref = _diag_gaussian_ref(mr, eps)
    assert z.shape == (B, C, H, W) and z.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(z.float(), z_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(post.mode(moments).float(), mean_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(post.kl(moments), kl_ref, rtol=tol, atol=tol * kl_ref.abs().max().item())
    z.float().sum().backward()
    z_ref.sum().backward()
    torch.testing.assert_close(moments.grad.float(), mr.grad, rtol=tol, atol=tol)
    # forward: sample + KL in one pass; eval gives the mean
    zz, kl = post.train()(moments.detach(), noise=eps.to(dtype))
    torch.testing.assert_close(zz, z.detach())
    torch.testing.assert_close(kl, post.kl(moments.detach()), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(post.eval()(moments.detach()).z, post.mode(moments.detach()))


def test_gaussian_posterior_seeded_and_gradcheck():
    B, N, C = 2, 6, 3
    moments = torch.randn(B, N, 2 * C)
    post = GaussianPosterior(backend="triton")
    z = post.sample(moments, seed=5)
    e1, _ = flow_noise(5, (B, N, C))
    torch.testing.assert_close(z, moments[..., :C] + torch.exp(0.5 * moments[..., C:]) * e1, rtol=1e-5, atol=1e-5)
    m = torch.randn(B, 2 * C, 2, 2, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(B, C, 2, 2, dtype=torch.float64)
    ref_post = GaussianPosterior(dim=1, backend="reference")
    assert torch.autograd.gradcheck(lambda m: ref_post.sample(m, noise=eps), (m,))
    assert torch.autograd.gradcheck(lambda m: ref_post.kl(m), (m,))
    with pytest.raises(ValueError, match="even"):
        post.sample(torch.randn(B, N, 5))


# ============================================================================= FlowMatchingLoss


def _sit_ref(pred, x, t, eps, path):
    """SiT / REPA's interpolant, from its formula: t = 0 data, x_t = α_t·x + σ_t·ε, v = α'_t·x + σ'_t·ε."""
    tt = t.reshape(-1, *([1] * (x.dim() - 1)))
    if path == "linear":
        a, s, da, ds = 1 - tt, tt, -torch.ones_like(tt), torch.ones_like(tt)
    else:
        a, s = torch.cos(tt * math.pi / 2), torch.sin(tt * math.pi / 2)
        da, ds = -math.pi / 2 * torch.sin(tt * math.pi / 2), math.pi / 2 * torch.cos(tt * math.pi / 2)
    xt = a * x + s * eps
    v = da * x + ds * eps
    return xt, ((pred - v) ** 2).mean()


def _rectok_ref(pred, x, t, eps, path):
    """Our convention: t = 1 data; linear t·x + (1 − t)·ε, cosine sin(πt/2)·x + cos(πt/2)·ε."""
    tt = t.reshape(-1, *([1] * (x.dim() - 1)))
    if path == "linear":
        xt, v = tt * x + (1 - tt) * eps, x - eps
    else:
        c, s = torch.cos(tt * math.pi / 2), torch.sin(tt * math.pi / 2)
        xt, v = s * x + c * eps, math.pi / 2 * (c * x - s * eps)
    return xt, ((pred - v) ** 2).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("time", ["rectok", "sit"])
@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_flow_matching_conventions_against_formula(backend, time, path):
    torch.manual_seed(5)
    B = 3
    x = torch.randn(B, 4, 3, 5, requires_grad=True)
    t = torch.rand(B, requires_grad=True)
    eps, pred = torch.randn(B, 4, 3, 5), torch.randn(B, 4, 3, 5, requires_grad=True)
    fm = FlowMatchingLoss(backend=backend, time=time, path=path)
    if path == "cosine" and backend == "triton":
        with pytest.raises(ValueError, match="cosine"):
            fm.xt(x, t, noise=eps)
        return
    xt = fm.xt(x, t, noise=eps)
    loss = fm(pred, x, t, noise=eps)
    ran = "reference" if path == "cosine" else backend
    assert last_backend("flow_matching_xt") == ran and last_backend("flow_matching_loss") == ran
    ref_fn = _sit_ref if time == "sit" else _rectok_ref
    xr, tr, pr = (v.detach().clone().requires_grad_() for v in (x, t, pred))
    xt_ref, loss_ref = ref_fn(pr, xr, tr, eps, path)
    torch.testing.assert_close(xt, xt_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    if time == "sit" and path == "linear" and backend == "reference":  # the sign map is exact: bit for bit
        assert torch.equal(loss, (pred.detach() - (eps - x.detach())).pow(2).mean())
    torch.testing.assert_close(
        fm.target(x.detach(), t.detach(), eps),
        _velocity(ref_fn, x.detach(), t.detach(), eps, path),
        rtol=1e-5,
        atol=1e-6,
    )
    g = torch.randn_like(xt)
    ((xt * g).sum() + loss).backward()
    ((xt_ref * g).sum() + loss_ref).backward()
    for a, b in ((x, xr), (t, tr), (pred, pr)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def _velocity(ref_fn, x, t, eps, path):
    """v from a reference: with pred = 0 the loss is mean(v²), so recover v by differentiating."""
    p = torch.zeros_like(x, requires_grad=True)
    loss = ref_fn(p, x, t, eps, path)[1]
    (g,) = torch.autograd.grad(loss, p)
    return -g * x.numel() / 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("time", ["rectok", "sit"])
def test_flow_matching_seeded_bf16_and_perfect_prediction(backend, time):
    B = 3
    x = torch.randn(B, 4, 3, 3)
    t = torch.tensor([0.2, 0.5, 0.9])
    fm = FlowMatchingLoss(backend=backend, time=time)
    xt = fm.xt(x, t, 1234)
    tt = t.view(-1, 1, 1, 1)
    # recover ε from x_t and check that the exact velocity gives zero loss
    eps = (xt - tt * x) / (1 - tt) if time == "rectok" else (xt - (1 - tt) * x) / tt
    v = x - eps if time == "rectok" else eps - x
    assert fm(v, x, t, 1234).item() < 1e-9
    assert fm(torch.zeros_like(x), x, t, 1234).item() > 0.5
    if backend == "triton":  # the in-kernel noise does not depend on the dtype (torch.randn's does)
        lb = fm(v.bfloat16(), x.bfloat16(), t, 1234)
        assert lb.dtype == torch.float32 and lb.item() < 1e-3
    with pytest.raises(ValueError, match="seed"):
        fm(v, x, t)


def test_flow_matching_cosine_seeded_and_gradcheck():
    fm = FlowMatchingLoss(time="sit", path="cosine")
    x, t = torch.randn(2, 3, 4), torch.rand(2)
    assert torch.equal(fm.xt(x, t, 7), fm.xt(x, t, 7))  # same seed, same noise
    eps = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(fm.xt(x, t, 7), _sit_ref(x, x, t, eps, "cosine")[0])
    with pytest.raises(ValueError, match="sample_offset"):
        fm.xt(x, t, 7, sample_offset=1)
    xd = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    td = torch.rand(2, dtype=torch.float64, requires_grad=True)
    pd = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ed = torch.randn(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p, x, t: fm(p, x, t, noise=ed), (pd, xd, td))
    assert torch.autograd.gradcheck(lambda x, t: fm.xt(x, t, noise=ed), (xd, td))


# ============================================================================= validation


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: FlowNoiser(backend="cuda"), "backend"),
        (lambda: FlowNoiser(shift=-1.0), "shift"),
        (lambda: FlowNoiser(gamma=-1.0, shift=1.0), "gamma"),
        (lambda: FlowNoiser(gamma=float("nan"), shift=1.0), "gamma"),
        (lambda: FlowNoiser(schedule="cosine"), "schedule"),
        (lambda: FlowNoiser(mode="multiply", shift=1.0), "mode"),
        (lambda: FlowNoiser(grid=0), "grid"),
        (lambda: FlowNoiser(num_tokens=0), "num_tokens"),
        (lambda: FlowNoiser(shift=1.0, dim=0), "dim"),
        (lambda: KLAlignLoss(0.0), "temperature"),
        (lambda: KLAlignLoss(1.0, backend="cpp"), "backend"),
        (lambda: MaskTokenRestore(0, 16), "dim"),
        (lambda: MaskTokenRestore(8, 0), "num_tokens"),
        (lambda: MaskTokenRestore(8, 16, init_std=-1.0), "init_std"),
        (lambda: TokenGather(backend="cuda"), "backend"),
        (lambda: CosineAlignLoss("l1"), "target"),
        (lambda: CosineAlignLoss(form="cos"), "form"),
        (lambda: CosineAlignLoss(margin=float("inf")), "margin"),
        (lambda: FlowMatchingLoss(time="edm"), "time"),
        (lambda: FlowMatchingLoss(path="vp"), "path"),
        (lambda: FlowMatchingLoss("cuda"), "backend"),
        (lambda: GaussianPosterior(dim=0), "dim"),
    ],
)
def test_constructors_validate(make, name):
    with pytest.raises(ValueError, match=name):
        make()


# ============================================================================= torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_module_paths_compile_fullgraph(backend):
    """The new layouts and conventions add no graph break (dynamo, fullgraph=True)."""
    torch._dynamo.reset()
    B, C, H, W = 2, 3, 2, 5
    mom, t = torch.randn(B, 2 * C, H, W), torch.rand(B)
    e1, e2 = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    noiser = FlowNoiser(gamma=2.0, shift=1.0, mode="additive", dim=1, backend=backend).train()
    post = GaussianPosterior(dim=1, backend=backend)
    cos = CosineAlignLoss("reconstruction", form="neg_cos", dim=1, backend=backend)
    fm = FlowMatchingLoss(backend=backend, time="sit")
    fmc = FlowMatchingLoss(time="sit", path="cosine")
    restore = MaskTokenRestore(C, num_tokens=H * W, backend=backend)
    tm = torch.rand(B, H * W) < 0.5
    feats = [torch.randn(B, H * W, C), torch.randn(B, H * W, C)]
    x = torch.randn(B, C, H, W)

    def step(mom, t, x):
        out = noiser(mom, t, noise=(e1, e2))
        z = post.sample(mom, noise=e1)
        a = cos([out.z_t, z], feats, tm)
        # a seed on the reference path builds a torch.Generator, which dynamo cannot create: noise there
        lin = fm(x, x, t, 7) if backend == "triton" else fm(x, x, t, noise=e2)
        b = lin + fmc(x, x, t, noise=e2)
        r = restore.replace(out.z_t.flatten(2).transpose(1, 2), tm)
        return a + b + r.sum() + post.kl(mom).sum()

    eager = step(mom, t, x)
    compiled = torch.compile(step, fullgraph=True, backend="eager")(mom, t, x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ============================================================================= host reads


def test_new_module_paths_read_nothing_back_to_the_host():
    """Fused path, forward + backward, under test_no_sync's guard (index checks trusted, as in training)."""
    from test_no_sync import no_host_reads

    from rectok_fast._validate import trusted_indices

    B, N, K, C, D = 2, 12, 5, 4, 8
    mom = torch.randn(B, N, 2 * C, requires_grad=True)
    cf = torch.randn(B, 2 * C, 3, 4, requires_grad=True)
    x = torch.randn(B, 3, 4, 4, requires_grad=True)
    pred = torch.randn(B, 3, 4, 4, requires_grad=True)
    t = torch.rand(B)
    mask = random_masking(B, N, num_kept=K)
    feats = torch.randn(B, N, D)
    restore = MaskTokenRestore(D, num_tokens=N, backend="triton")
    proj = torch.nn.Linear(C, D)
    with no_host_reads() as seen, trusted_indices():
        out = FlowNoiser(gamma=1.0, num_tokens=N, mode="additive", backend="triton").train()(mom, seed=3)
        z2 = GaussianPosterior(dim=1, backend="triton").train()(cf, seed=4)
        fm = FlowMatchingLoss(backend="triton", time="sit")
        lf = fm(pred, x, t, 5) + FlowMatchingLoss(time="sit", path="cosine")(pred, x, t, 5)
        h = proj(out.z_t)
        vis = TokenGather(backend="triton")(h, mask.ids_keep)
        full = restore(vis, mask.ids_restore) + restore.replace(h, mask.token_mask)
        cos = CosineAlignLoss("reconstruction", form="neg_cos", backend="triton")(
            [full, h], [feats, feats], mask.token_mask
        )
        loss = cos + lf + out.kl.mean() + z2.kl.mean() + z2.z.sum() + fm.xt(x, t, 5).sum()
        loss.backward()
    assert not seen, seen


# ============================================================================= NaN / Inf / empty


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf_propagate_and_empty_batches(backend):
    B, N, C = 2, 5, 3
    mom = torch.randn(B, N, 2 * C)
    mom[0, 1, 2], mom[1, 3, 0] = float("nan"), float("inf")
    t = torch.rand(B)
    e1, e2 = torch.randn(B, N, C), torch.randn(B, N, C)
    for mode in NOISE_MODES:
        out = FlowNoiser(gamma=1.0, shift=1.0, mode=mode, backend=backend).train()(mom, t, noise=(e1, e2))
        _, zt_ref = _noise_ref(mom, t, 1.0, e1, e2, mode)
        assert torch.equal(out.z_t.isnan(), zt_ref.isnan()) and torch.equal(out.z_t.isinf(), zt_ref.isinf())
        assert out.z_t.isnan().any() and out.z_t.isinf().any()
    pred, x = torch.randn(B, 4), torch.randn(B, 4)
    pred[1, 2] = float("nan")
    for path in FM_PATHS:
        if backend == "triton" and path == "cosine":
            continue
        assert FlowMatchingLoss(backend=backend, time="sit", path=path)(pred, x, t, noise=x).isnan()
    p, tg = torch.randn(B, N, 7), torch.randn(B, N, 7)
    p[0, 0, 0] = float("nan")
    assert CosineAlignLoss(form="neg_cos", backend=backend)(p, tg).isnan()
    # empty batches keep their shapes
    empty = FlowNoiser(gamma=1.0, shift=1.0, mode="additive", backend=backend).train()(
        torch.randn(0, N, 2 * C), torch.rand(0), noise=(torch.randn(0, N, C), torch.randn(0, N, C))
    )
    assert empty.z_t.shape == (0, N, C) and empty.kl.shape == (0,)
    zs = GaussianPosterior(dim=1, backend=backend).sample(torch.randn(0, 4, 2, 2), noise=torch.randn(0, 2, 2, 2))
    assert zs.shape == (0, 2, 2, 2)
