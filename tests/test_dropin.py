"""The README's "Using rectok_fast in another tokenizer" snippets run as written, and each computes
the formula it names (checked here against the formula written out by hand)."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
import torch.nn.functional as F

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    text = README.read_text()
    section = text[text.index("<!-- dropin:start -->") : text.index("<!-- dropin:end -->")]
    blocks = section.split("```python\n")[1:]
    return [b.split("```", 1)[0] for b in blocks]


SNIPPETS = _snippets()
PROJECTS = ["VA-VAE", "REPA", "REPA-E", "l-DeTok", "MAETok"]


def _run(i: int) -> dict:
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(SNIPPETS[i], f"README.md[dropin {PROJECTS[i]}]", "exec"), scope)
    loss = scope["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    return scope


def test_one_snippet_per_project():
    assert len(SNIPPETS) == len(PROJECTS)


def _cos_tokens(a, b):
    return F.cosine_similarity(a, b, dim=-1, eps=1e-8)


def test_vavae_vf_loss():
    s = _run(0)
    zp, f = s["zp"].detach(), s["dinov2"]
    zt = zp.flatten(2).transpose(1, 2)  # (B, H·W, D)
    mcos = F.relu(1 - 0.5 - _cos_tokens(zt, f)).mean()
    zn, fn = F.normalize(zt, dim=-1), F.normalize(f, dim=-1)
    mdms = F.relu((zn @ zn.transpose(1, 2) - fn @ fn.transpose(1, 2)).abs() - 0.25).mean()
    torch.testing.assert_close(s["vf"].detach(), mcos + mdms, rtol=1e-5, atol=1e-6)
    # the adaptive weight: 0.1 · ‖∇nll‖ / (‖∇vf‖ + 1e-4) at the encoder's last conv (on a fresh graph:
    # the snippet's was freed by its backward)
    W = s["enc_last"].weight
    z = s["posterior"].eval()(s["enc_last"](s["h"])).z
    nll = (s["dec"](z) - s["images"]).abs().mean()
    zp2 = s["proj"](z)
    vf = s["CosineAlignLoss"](margin=0.5, dim=1)(zp2, f) + s["DistMatAlignLoss"](margin=0.25, dim=1)(zp2, f)
    w = s["adaptive_weight"](nll, vf, W, scale=0.1)
    (g_nll,) = torch.autograd.grad(nll, W, retain_graph=True)
    (g_vf,) = torch.autograd.grad(vf, W)
    torch.testing.assert_close(w, 0.1 * g_nll.norm() / (g_vf.norm() + 1e-4), rtol=1e-5, atol=1e-7)
    assert s["w"].dim() == 0 and not s["w"].requires_grad
    # the posterior's KL is DiagonalGaussianDistribution's
    mean, logvar = s["enc_last"](s["h"]).detach().chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=[1, 2, 3])
    torch.testing.assert_close(s["kl"].detach(), kl, rtol=1e-5, atol=1e-5)
    assert s["enc_last"].weight.grad is not None


@pytest.mark.parametrize("i", [1, 2])
def test_repa_and_repa_e(i):
    s = _run(i)
    x, t = s["x"].detach(), s["t"]
    tt = t.view(-1, 1, 1, 1)
    # SiT's interpolant: recover ε from x_t = (1 − t)·x + t·ε, then L_v = mean((v − (ε − x))²)
    seed = 0 if i == 1 else 1
    xt = s["fm"].xt(x, t, seed=seed)
    eps = (xt - (1 - tt) * x) / tt
    sit = s["sit"]
    v = sit(xt).detach()
    torch.testing.assert_close(s["fm"](v, x, t, seed=seed), ((v - (eps - x)) ** 2).mean(), rtol=1e-5, atol=1e-6)
    h = v.flatten(2).transpose(1, 2)
    repa = -_cos_tokens(s["proj"](h), s["y_dino"]).mean()
    torch.testing.assert_close(s["repa"]([s["proj"](h)], [s["y_dino"]]), repa, rtol=1e-5, atol=1e-6)
    if i == 2:  # REPA-E: the REPA loss reaches the VAE, the diffusion loss does not
        enc = s["vae_enc"]
        x_new = s["bn"](enc(s["images"]))
        fm = s["fm"]
        l_diff = fm(sit(fm.xt(x_new.detach(), t, seed=1)), x_new.detach(), t, seed=1)
        assert torch.autograd.grad(l_diff, enc.weight, allow_unused=True) == (None,)
        h_e2e = sit(fm.xt(x_new, t, seed=1)).flatten(2).transpose(1, 2)
        (g,) = torch.autograd.grad(s["repa"]([s["proj"](h_e2e)], [s["y_dino"]]), enc.weight)
        assert g.abs().sum() > 0


def test_ldetok_noise_and_masking():
    s = _run(3)
    mask, z, z_t = s["mask"], s["z"], s["z_t"]
    B, N = s["B"], s["N"]
    K = int(N * (1 - 0.5))
    assert mask.ids_keep.shape == (B, K) and z.shape == z_t.shape == (B, K, s["C"])
    torch.testing.assert_close(
        s["x"], s["patches"][torch.arange(B)[:, None], mask.ids_keep] + s["pos"][0, mask.ids_keep]
    )
    # z_t = (1 − τ)·z + τ·γ·ε with one τ per image: (z_t − (1 − τ)·z) / (τ·γ) is a standard-normal ε
    out = s["noiser"](z.detach(), torch.full((B,), 0.25), noise=torch.ones_like(z))
    torch.testing.assert_close(out.z_t, 0.75 * z.detach() + 0.25 * 3.0 * torch.ones_like(z))
    assert out.kl is None
    dec = s["dec_in"]
    assert dec.shape == (B, N, s["D"])


def test_maetok_masking_and_feature_target():
    s = _run(4)
    tm, masker = s["mask"].token_mask, s["masker"]
    x = s["x"].detach()
    ref = torch.where(tm[..., None], masker.mask_token.detach(), s["patches"]) + masker.positional_embedding.detach()
    torch.testing.assert_close(x, ref)
    per = 1 - _cos_tokens(s["feat"].detach(), s["teacher"])
    torch.testing.assert_close(s["loss"].detach(), per[tm].mean(), rtol=1e-5, atol=1e-6)
    assert masker.mask_token.grad is not None and masker.mask_token.grad.abs().sum() > 0


def test_the_shift_sentence_holds():
    """The README's note: with num_tokens=N the shift is sqrt(N·C/4096) whatever K the encoder passes."""
    from rectok_fast import schedules
    from rectok_fast.nn import FlowNoiser

    N, K, C = 256, 100, 16
    noiser = FlowNoiser(gamma=1.0, schedule="shift", num_tokens=N, backend="reference").train()
    out = noiser(torch.randn(3, K, 2 * C), seed=0, generator=torch.Generator().manual_seed(1))
    u = torch.rand(3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.t, schedules.shift_time(u, math.sqrt(N * C / 4096)))
