"""The training recipe as the released checkpoints were trained (method §3–4), one test per point, and
the public loss composition (rectok_fast.train.losses.TokenizerLoss) term by term."""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from pipeline_helpers import synthetic_latent_cache, tiny_dit_cfg, tiny_tokenizer_cfg

import rectok_fast
from rectok_fast.config import LossConfig, load_config, resolve_config_path
from rectok_fast.train import dit as dit_module
from rectok_fast.train.dit import DiTTrainer
from rectok_fast.train.losses import (
    ConvNeXtLogitLoss,
    PatchGANDiscriminator,
    TokenizerLoss,
    TokenizerLossOutput,
    hinge_d_loss,
    hinge_g_loss,
)
from rectok_fast.train.tokenizer import TokenizerTrainer
from rectok_fast.utils.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")

PKG = pathlib.Path(rectok_fast.__file__).parent


def _first_batch(tr):
    from rectok_fast.data.sampler import set_loader_epoch

    set_loader_epoch(tr.loader, 0, 0)
    return next(iter(tr.loader))


# ----------------------------------------------------------------------------- 1. GAN weight 0.1


@pytest.mark.parametrize("recipe", ["tokenizer/rectok_bb_stage1", "tokenizer/rectok_bb_stage2", "tokenizer/tiny"])
def test_gan_weight_is_0_1(recipe):
    cfg = load_config(resolve_config_path(recipe))
    assert cfg.loss.gan == 0.1
    if cfg.stage == 2:
        assert cfg.loss.gan_start_epoch == 0  # stage 2: the GAN from the start, same weight


def test_gan_weight_default_and_comments():
    assert LossConfig().gan == 0.1
    tiny2 = load_config(resolve_config_path("tokenizer/tiny_stage2"))
    assert tiny2.loss.gan == 0.0  # off in the tiny stage 2 (a few hundred CPU steps); its comment says 0.1
    for name in ("tiny_stage2", "tiny", "rectok_bb_stage1", "rectok_bb_stage2"):
        text = pathlib.Path(resolve_config_path(f"tokenizer/{name}")).read_text()
        assert "gan=0.5" not in text and "gan: 0.5" not in text, name


# ----------------------------------------------------------------------------- 2. discriminator on [0, 1]


class RecordingDisc(torch.nn.Module):
    """A 1×1-conv discriminator that records what it is fed and what it returns."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        out = self.conv(x)
        self.seen.append((x.detach().clone(), out.detach().clone()))
        return out


def _outputs(recon, kl=0.5, sem=0.25):
    return SimpleNamespace(reconstruction=recon, kl=torch.tensor(kl), sem_loss=None if sem is None else torch.tensor(sem))


def test_tokenizer_loss_terms_and_discriminator_inputs():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    recon = (torch.rand(2, 3, 8, 8) * 2.4 - 1.2).requires_grad_(True)
    perceptual = lambda a, b: (a - b).abs().mean()  # noqa: E731  (a stand-in with the PerceptualLoss signature)

    class P(torch.nn.Module):
        def forward(self, a, b):
            return perceptual(a, b)

    disc = RecordingDisc()
    crit = TokenizerLoss(l2=1.0, perceptual_weight=1.0, kl=1e-6, semantic=1.0, gan=0.1, gan_start_step=5, perceptual=P())
    x01, r01 = images * 0.5 + 0.5, recon.detach() * 0.5 + 0.5

    off = crit(images, _outputs(recon), step=4, discriminator=disc)
    assert isinstance(off, TokenizerLossOutput) and off.disc_loss is None and "g" not in off.terms and not disc.seen
    assert list(off.terms) == ["l2", "perceptual", "kl", "sem"]

    res = crit(images, _outputs(recon), step=5, discriminator=disc)
    torch.testing.assert_close(res.terms["l2"], F.mse_loss(r01, x01))
    torch.testing.assert_close(res.terms["perceptual"], perceptual(recon, images))
    (g_in, g_out), (real_in, real_out), (fake_in, fake_out) = disc.seen
    # the [0, 1] images, for the generator term and for the hinge loss alike
    torch.testing.assert_close(g_in, r01)
    torch.testing.assert_close(real_in, x01)
    torch.testing.assert_close(fake_in, r01)
    torch.testing.assert_close(res.terms["g"], hinge_g_loss(g_out))
    torch.testing.assert_close(res.disc_loss, hinge_d_loss(real_out, fake_out))
    w = {"l2": 1.0, "perceptual": 1.0, "kl": 1e-6, "sem": 1.0, "g": 0.1}
    for k, v in res.terms.items():
        torch.testing.assert_close(res.weighted[k], w[k] * v)
    torch.testing.assert_close(res.loss, sum(res.weighted.values()))
    # the generator term trains the tokenizer only; the hinge loss the discriminator only
    res.loss.backward()
    assert recon.grad is not None and disc.conv.weight.grad is None
    assert all(p.requires_grad for p in disc.parameters())
    res.disc_loss.backward()
    assert disc.conv.weight.grad is not None


def test_tokenizer_loss_stage2_and_ddp_wrapper():
    """Stage 2 = the same module with KL and semantic weights 0 and the GAN from step 0; a DDP-style
    wrapper is called for the hinge loss only (the generator term runs through ``.module``)."""

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module, self.calls = m, 0

        def forward(self, x):
            self.calls += 1
            return self.module(x)

    images, recon = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    wrapped = Wrapper(RecordingDisc())
    crit = TokenizerLoss(kl=0.0, semantic=0.0, gan=0.1, gan_start_step=0)
    res = crit(images, _outputs(recon), step=0, discriminator=wrapped)
    assert list(res.terms) == ["l2", "g"] and wrapped.calls == 2 and len(wrapped.module.seen) == 3
    none = TokenizerLoss(gan=0.1)(images, _outputs(recon, sem=None), step=10**6, discriminator=None)
    assert "g" not in none.terms and "sem" not in none.terms and none.disc_loss is None
    assert "gan=0.1" in repr(crit)


def test_tokenizer_trainer_feeds_the_discriminator_0_1_images(tmp_path):
    """Through the trainer: the criterion is TokenizerLoss, the real branch of the hinge loss is
    exactly images·0.5 + 0.5, and the generator term sees the same [0, 1] reconstruction as the fake branch."""
    tr = TokenizerTrainer(tiny_tokenizer_cfg(str(tmp_path)))
    assert isinstance(tr.criterion, TokenizerLoss) and tr.criterion.gan == 0.1 and tr.gan_start_step == 0
    calls = []
    crit = tr.criterion
    tr.criterion = lambda *a, **k: calls.append(1) or crit(*a, **k)
    seen = []
    tr.raw_disc.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    batch = _first_batch(tr)
    losses = tr.micro_step(batch, tr.draw_step_randomness(tr.global_batch), 0)
    assert calls == [1] and {"l2", "kl", "sem", "g", "loss", "d"} <= set(losses)
    g_in, real_in, fake_in = seen
    images = batch[0][: tr.micro]
    assert bool((images < 0).any())  # the data is in [-1, 1] ...
    torch.testing.assert_close(real_in, images * 0.5 + 0.5, rtol=0, atol=0)  # ... the discriminator sees [0, 1]
    torch.testing.assert_close(g_in, fake_in, rtol=0, atol=0)


# ----------------------------------------------------------------------------- 3. ConvNeXt-S at 224 px, bilinear


def test_convnext_inputs_resized_bilinear_antialias():
    pytest.importorskip("torchvision", reason="the ConvNeXt-S logit loss builds torchvision's convnext_small")
    loss = ConvNeXtLogitLoss(pretrained=False)
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return x.flatten(1)[:, :10]

    loss.net = Net()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    loss(x, x.flip(-1))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    resized = F.interpolate(x * 0.5 + 0.5, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    want = (resized - mean) / std
    assert seen[-1].shape == (2, 3, 224, 224)
    torch.testing.assert_close(seen[-1], want, rtol=1e-5, atol=1e-5)
    bicubic = F.interpolate(x * 0.5 + 0.5, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(seen[-1], (bicubic - mean) / std, atol=1e-3)


# ----------------------------------------------------------------------------- 4. per-GPU BatchNorm


def test_discriminator_keeps_per_gpu_batchnorm(tmp_path, monkeypatch):
    def no_sync_bn(module, *a, **k):
        raise AssertionError("the discriminator must keep per-GPU BatchNorm (no SyncBatchNorm)")

    monkeypatch.setattr(torch.nn.SyncBatchNorm, "convert_sync_batchnorm", no_sync_bn)
    monkeypatch.setattr(TokenizerTrainer, "wrap_ddp", lambda self, module, find_unused=False: module)
    tr = TokenizerTrainer(tiny_tokenizer_cfg(str(tmp_path)), dist_info=DistInfo(rank=0, world_size=2))
    assert tr.dist.distributed
    kinds = {type(m) for m in tr.raw_disc.modules()}
    assert torch.nn.BatchNorm2d in kinds and torch.nn.SyncBatchNorm not in kinds
    assert isinstance(tr.raw_disc, PatchGANDiscriminator)
    for path in (PKG / "train").rglob("*.py"):  # and nothing in the pipelines converts it on a GPU either
        assert "convert_sync_batchnorm" not in path.read_text(), path


# ----------------------------------------------------------------------------- 5. DiT: t = u when s <= 1


def test_dit_trainer_time_is_u_without_shift_and_calls_training_loss(tmp_path, monkeypatch):
    lat = synthetic_latent_cache(str(tmp_path / "lat"), n=16)
    tr = DiTTrainer(tiny_dit_cfg(str(tmp_path / "run"), lat, data={"global_batch_size": 8, "grad_accum": 2}))
    assert tr.shift < 1  # 2×2 grid of 8 channels
    g = torch.Generator().set_state(tr.rand.get_state())
    rnd = tr.draw_step_randomness(tr.global_batch)
    G, C, gr = tr.global_batch, tr.channels, tr.grid
    u = torch.rand(G, generator=g)
    assert torch.equal(rnd["t"], u)  # t = u, not 1 - u
    x0 = torch.randn(G, C, gr, gr, generator=g)
    eps = torch.randn(G, gr * gr, C, generator=g)
    drop = torch.rand(G, generator=g) < tr.cfg.loss.label_dropout
    assert torch.equal(rnd["x0"], x0) and torch.equal(rnd["eps_post"], eps) and torch.equal(rnd["drop"], drop)

    # the micro-step is training_loss with this micro-batch's slices, and equals the loss written out
    calls = []
    real = dit_module.training_loss
    monkeypatch.setattr(dit_module, "training_loss", lambda *a, **k: calls.append(k) or real(*a, **k))
    batch = _first_batch(tr)
    loss = tr.micro_step(batch, rnd, 1)["loss"]
    (kw,) = calls
    assert torch.equal(kw["t"], rnd["t"][4:8]) and torch.equal(kw["drop_mask"], rnd["drop"][4:8])
    assert torch.equal(kw["noise"], rnd["x0"][4:8])
    x1, y = tr.latents_from_batch(batch, rnd["eps_post"][4:8])
    moments = batch[0].float()
    mean, logvar = moments[..., :C], moments[..., C:].clamp(-30, 20)
    z = (mean + torch.exp(0.5 * logvar) * rnd["eps_post"][4:8] - tr.lat_mean) * tr.scale / tr.lat_std
    torch.testing.assert_close(x1, z.transpose(1, 2).reshape(4, C, gr, gr), rtol=0, atol=0)
    t, x0 = rnd["t"][4:8].view(-1, 1, 1, 1), rnd["x0"][4:8]
    with torch.no_grad():
        pred = tr.model(t * x1 + (1 - t) * x0, rnd["t"][4:8], torch.where(rnd["drop"][4:8], tr.num_classes, y))
    torch.testing.assert_close(loss, (pred - (x1 - x0)).pow(2).mean(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- 6. stage 2 samples the posterior


def test_stage2_samples_the_posterior(tmp_path):
    cfg = tiny_tokenizer_cfg(
        str(tmp_path),
        stage=2,
        model={"extra": {"mask_ratio": 0.0, "mask_ratio_min": 0.0, "gamma": 0.0}},
        loss={"kl": 0.0, "semantic": 0.0},
    )
    tr = TokenizerTrainer(cfg)
    seen = []
    tr.raw_model.decoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    rnd = tr.draw_step_randomness(tr.global_batch)
    assert rnd["mask"].ids_keep is None and not rnd["t"].any()
    batch = _first_batch(tr)
    tr.micro_step(batch, rnd, 0)
    with torch.no_grad():
        moments = tr.raw_model.encode(batch[0][: tr.micro])
    C = tr.raw_model.token_channels
    mean, logvar = moments[..., :C], moments[..., C:].clamp(-30, 20)
    eps = rnd["eps_post"][: tr.micro]
    torch.testing.assert_close(seen[0], mean + torch.exp(0.5 * logvar) * eps)  # z_t = z = mean + std·eps
    assert not torch.allclose(seen[0], mean)
