"""RecTok: golden tensors of the original implementation, from_official on the released key layout,
shape inference on other configurations, save/load, masking and the training forward."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import reference_file

from rectok_fast import schedules
from rectok_fast.models import RECTOK_SIZES, RecTok, TinyTeacher
from rectok_fast.models.rectok import NOISE_SCHEDULES, SEM_TARGETS, Mask, RecTokConfig
from rectok_fast.nn import CosineAlignLoss, FlowNoiser
from rectok_fast.nn.fused import SEMANTIC_TARGETS
from rectok_fast.ops.posterior_flow import posterior_flow
from rectok_fast.schedules import shift_time


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def golden():
    return torch.load(reference_file("golden_rectok_tiny.pt"), weights_only=True)


@pytest.fixture(scope="module")
def golden_model(golden):
    return RecTok.from_official(golden["state_dict"])


# ----------------------------------------------------------------------------- golden


def test_golden_config_inferred(golden, golden_model):
    c = golden_model.config
    g = golden["config"]
    assert (c.img_size, c.patch_size, c.token_channels) == (g["img_size"], g["patch_size"], g["token_channels"])
    assert c.encoder == RECTOK_SIZES[g["enc"]] and c.decoder == RECTOK_SIZES[g["dec"]]
    assert c.sem_decoder == RECTOK_SIZES[g["sem_model_size"]]
    assert c.teachers == {g["teacher_key"]: g["sem_dim"]}
    assert not golden_model.training


@torch.no_grad()
def test_golden_encode_decode(golden, golden_model):
    m, x, o = golden_model, golden["inputs"]["images"], golden["outputs"]
    C = m.token_channels
    moments = m.encode(x)
    assert rel(moments, o["moments"]) <= 1e-5
    assert rel(m.decode(moments[..., :C]), o["decoded_from_mean"]) <= 1e-5
    grid = moments[..., :C].transpose(1, 2).reshape(x.shape[0], C, m.grid, m.grid)
    assert rel(m.decode(grid), o["decoded_from_mean"]) <= 1e-5  # (B, C, g, g) input
    assert rel(m(x), o["decoded_from_mean"]) <= 1e-5  # eval forward
    torch.testing.assert_close(m.encoder.rope_table, o["rope_encoder"], atol=0, rtol=0)


@torch.no_grad()
def test_golden_masked_decoders(golden, golden_model):
    m, o = golden_model, golden["outputs"]
    C = m.token_channels
    ids_keep, ids_restore = o["ids_keep"], o["ids_restore"]
    z_vis = torch.gather(o["moments"][..., :C], 1, ids_keep[..., None].expand(-1, -1, C))
    assert rel(m.decode(z_vis, ids_restore), o["decoded_masked"]) <= 1e-5
    assert rel(m.predict_teacher_features(z_vis, ids_restore), o["sem_pred_masked"]) <= 1e-5
    assert rel(m.predict_teacher_features(z_vis, ids_restore, teacher="dinov3"), o["sem_pred_masked"]) <= 1e-5


@torch.no_grad()
def test_golden_tokenize_detokenize(golden):
    m = RecTok.from_official(golden["state_dict"])
    x, o = golden["inputs"]["images"], golden["outputs"]
    m.set_latent_stats(o["stats_mean"], o["stats_std"])
    assert rel(m.tokenize(x), o["tokens"]) <= 1e-5
    assert rel(m.detokenize(o["tokens"]), o["detokenized"]) <= 1e-5
    img = m.detokenize(o["tokens"])
    assert img.min() >= 0 and img.max() <= 1


def test_golden_flow_and_shift(golden, golden_model):
    o = golden["outputs"]
    C = golden_model.token_channels
    t = o["flow_t"].reshape(-1)
    eps = o["flow_eps"]
    _, z_t, _ = posterior_flow(o["moments"], t, 1.0, noise=(torch.zeros_like(eps), eps), sample_posterior=False)
    assert rel(z_t, o["flow_zt"]) <= 1e-5
    assert rel(o["moments"][..., :C] * (1 - t[:, None, None]) + t[:, None, None] * eps, o["flow_zt"]) <= 1e-5
    assert golden_model.timestep_shift == pytest.approx(float(o["shift"]), rel=1e-6)
    assert rel(shift_time(o["shift_u"], golden_model.timestep_shift), o["shift_t"]) <= 1e-5


# ----------------------------------------------------------------------------- from_official


def _tsv_state_dict(path: str, fill: bool) -> dict[str, torch.Tensor]:
    sd = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, _ = line.rstrip("\n").split("\t")
            dims = tuple(int(d) for d in re.findall(r"\d+", shape))
            sd[key] = torch.randn(dims) * 0.02 if fill else torch.zeros(dims)
    return sd


def test_from_official_released_layout():
    """The real checkpoint's key layout (.tsv): configuration inferred, every key consumed."""
    sd = _tsv_state_dict(reference_file("rectok_bb_ch128_state_dict.tsv"), fill=False)
    for v in (sd["decoder.ffn.1.weight"], sd["encoder.latent_head.weight"], sd["encoder.patch_embed.0.weight"]):
        v.normal_(0, 0.02)
    assert "decoder.ffn.1.weight" in sd and "encoder.patch_embed.0.weight" in sd
    teacher_junk = {"sem_foundation_models.dinov3.embeddings.patch_embeddings.weight": torch.zeros(4, 3, 16, 16)}
    ckpt = {"model": {"module." + k: v for k, v in sd.items()}, "model_ema": {**sd, **teacher_junk}, "args": None}
    m = RecTok.from_official(ckpt)
    c = m.config
    assert (c.img_size, c.patch_size, c.token_channels, c.grid) == (256, 16, 128, 16)
    assert c.encoder == (768, 12, 12) and c.decoder == (768, 12, 12) and c.sem_decoder == (192, 3, 4)
    assert c.teachers == {"dinov3": 1024}
    n_params = sum(p.numel() for n, p in m.named_parameters())
    assert n_params == sum(v.numel() for v in sd.values())
    assert abs(n_params / 1e6 - 173.577) < 1e-3
    assert torch.equal(m.state_dict()["decoder.ffn.1.weight"], sd["decoder.ffn.1.weight"])  # EMA weights chosen
    m_raw = RecTok.from_official(ckpt, use_ema=False)
    assert torch.equal(m_raw.encoder.latent_head.weight, sd["encoder.latent_head.weight"])
    with torch.no_grad():
        x = torch.rand(1, 3, 256, 256) * 2 - 1
        moments = m.encode(x)
        assert moments.shape == (1, 256, 256)
        assert m.decode(moments[..., :128]).shape == (1, 3, 256, 256)
        assert m.predict_teacher_features(moments[..., :128]).shape == (1, 256, 1024)


def _random_official(cfg: RecTokConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = RecTok(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {k: v for k, v in m.state_dict().items() if not k.startswith("latent_")}


@pytest.mark.parametrize(
    "cfg",
    [
        dict(
            img_size=96, token_channels=16, encoder="tiny", decoder="small", sem_decoder="tiny", teachers={"dinov2": 40}
        ),
        dict(img_size=64, token_channels=8, encoder="tiny", decoder=(64, 1, 1), teachers={"dinov3": 24, "siglip": 16}),
        dict(
            img_size=48,
            patch_size=8,
            token_channels=4,
            encoder=(64, 2, 2),
            decoder=(64, 1, 1),
            sem_decoder=(32, 1, 2),
            teachers={"t": 8},
        ),
    ],
)
def test_from_official_other_configs(cfg, tmp_path):
    """Other grids, channel counts, widths and several teachers: inferred from shapes alone, identical outputs."""
    config = RecTokConfig(**cfg)
    sd = _random_official(config, seed=len(cfg["teachers"]))
    overrides = {}
    for key in ("encoder", "decoder", "sem_decoder"):  # heads of non-standard widths are not in the shapes
        if isinstance(cfg.get(key), tuple):
            overrides[key] = cfg[key]
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    m = RecTok.from_official(str(path), **overrides)
    assert m.config.img_size == config.img_size and m.config.token_channels == config.token_channels
    assert m.config.teachers == config.teachers and m.config.patch_size == config.patch_size
    want = cfg["encoder"] if isinstance(cfg["encoder"], tuple) else RECTOK_SIZES[cfg["encoder"]]
    assert m.config.encoder == want
    ref = RecTok(config).eval()
    ref.load_state_dict(sd, strict=False)
    x = torch.rand(2, 3, config.img_size, config.img_size) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(m.encode(x), ref.encode(x))
        z = m.encode(x)[..., : config.token_channels]
        torch.testing.assert_close(m.decode(z), ref.decode(z))
        feats = m.predict_teacher_features(z)
        if len(config.teachers) > 1:
            assert set(feats) == set(config.teachers)
            for name, w in config.teachers.items():
                assert feats[name].shape == (2, config.num_tokens, w)


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_heads_inferred_from_width(size):
    width, depth, heads = RECTOK_SIZES[size]
    cfg = RecTokConfig(img_size=32, token_channels=4, encoder=size, decoder="tiny", teachers={"t": 8})
    with torch.device("meta"):
        sd = RecTok(cfg).state_dict()
    assert RecTok.config_from_state_dict(sd).encoder == (width, depth, heads)


def test_from_official_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        RecTok.from_official(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="patch_embed"):
        RecTok.from_official({"foo.weight": torch.zeros(1)})
    with pytest.raises(TypeError):
        RecTok.from_official(42)


# ----------------------------------------------------------------------------- save / load


def test_save_load_pretrained(tmp_path):
    cfg = RecTokConfig(
        img_size=32,
        token_channels=4,
        encoder=(32, 1, 2),
        decoder=(32, 1, 2),
        sem_decoder=(32, 1, 2),
        teachers={"tiny": 8},
        gamma=0.5,
    )
    m = RecTok(cfg).eval()
    m.set_latent_stats(torch.randn(4), torch.rand(4) + 0.5)
    m.save_pretrained(tmp_path)
    m2 = RecTok.from_pretrained(tmp_path)
    assert m2.config == m.config
    torch.testing.assert_close(m2.latent_std, m.latent_std)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(m2.tokenize(x), m.tokenize(x))
        torch.testing.assert_close(m2.detokenize(m.tokenize(x)), m.detokenize(m.tokenize(x)))


# ----------------------------------------------------------------------------- masking + training


def _small(**kw) -> RecTok:
    base = dict(
        img_size=64,
        token_channels=8,
        encoder=(48, 1, 2),
        decoder=(48, 1, 2),
        sem_decoder=(32, 1, 2),
        teachers={"tiny": 16},
    )
    base.update(kw)
    return RecTok(RecTokConfig(**base))


def test_masking_draw():
    m = _small()
    N = m.config.num_tokens
    m.seed_masking(0)
    ks = {m.draw_num_kept() for _ in range(300)}
    assert min(ks) >= math.ceil(N * 0.6) and max(ks) == N  # r = max(0, U(-0.1, 0.4))
    assert len(ks) > 3
    mask = m.sample_mask(3, num_kept=10)
    assert mask.ids_keep.shape == (3, 10) and mask.ids_restore.shape == (3, N)
    ids_shuffle = torch.argsort(mask.ids_restore, dim=1)
    torch.testing.assert_close(ids_shuffle[:, :10], mask.ids_keep)
    with pytest.raises(ValueError, match="num_kept"):
        m.sample_mask(1, num_kept=N + 1)


def test_training_forward_matches_pieces():
    torch.manual_seed(3)
    m = _small().train()
    B, N, C = 2, 16, 8
    x = torch.rand(B, 3, 64, 64) * 2 - 1
    mask = m.sample_mask(B, num_kept=11)
    t = torch.tensor([0.3, 0.8])
    noise = (torch.randn(B, 11, C), torch.randn(B, 11, C))
    feats = {"tiny": torch.randn(B, N, 16)}
    out = m(x, mask=mask, t=t, noise=noise, teacher_features=feats, return_z=True)
    moments = m.encode(x, mask.ids_keep)
    mean, logvar = moments[..., :C], moments[..., C:].clamp(-30, 20)
    z = mean + torch.exp(0.5 * logvar) * noise[0]
    z_t = (1 - t[:, None, None]) * z + t[:, None, None] * noise[1]
    torch.testing.assert_close(out.z, z)
    torch.testing.assert_close(out.z_t, z_t)
    torch.testing.assert_close(out.reconstruction, m.decode(z_t, mask.ids_restore))
    pred = m.predict_teacher_features(z_t, mask.ids_restore)
    torch.testing.assert_close(out.sem_pred["tiny"], pred)
    cos = torch.nn.functional.cosine_similarity(pred, feats["tiny"], dim=-1)
    torch.testing.assert_close(out.sem_loss, (1 - cos).mean(), atol=1e-5, rtol=1e-5)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2)).mean()
    torch.testing.assert_close(out.kl, kl)
    assert out.token_mask.sum().item() == B * (N - 11)
    (out.reconstruction.square().mean() + out.kl * 1e-6 + out.sem_loss).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_sample_mask_generator_rows_and_rng_state():
    """The trainer's mask plan: ``sample_mask(generator=)`` is ``argsort(rand(B, N))`` from that
    generator; ``Mask.rows`` slices a micro-batch and keeps ``ids_keep``'s dim 1 dynamic; the mask-ratio
    RNG state is public and round-trips."""
    m = _small()
    N = m.config.num_tokens
    mask = m.sample_mask(4, num_kept=9, generator=torch.Generator().manual_seed(7))
    shuffle = torch.argsort(torch.rand(4, N, generator=torch.Generator().manual_seed(7)), dim=1)
    assert torch.equal(mask.ids_keep, shuffle[:, :9]) and torch.equal(mask.ids_restore, torch.argsort(shuffle, dim=1))
    assert 1 in getattr(mask.ids_keep, "_dynamo_weak_dynamic_indices", set())
    part = mask.rows(1, 3)
    assert torch.equal(part.ids_keep, mask.ids_keep[1:3]) and torch.equal(part.ids_restore, mask.ids_restore[1:3])
    assert 1 in getattr(part.ids_keep, "_dynamo_weak_dynamic_indices", set())
    assert Mask(None, None).rows(0, 2) == Mask(None, None)
    m.seed_masking(3)
    state = m.mask_rng_state
    ks = [m.draw_num_kept() for _ in range(20)]
    m.mask_rng_state = state
    assert [m.draw_num_kept() for _ in range(20)] == ks
    other = _small()
    other.mask_rng_state = state
    assert [other.draw_num_kept() for _ in range(20)] == ks


def test_training_forward_runs_through_flow_noiser_and_cosine_align_loss():
    """One owner per chore: the forward's noise and semantic loss are nn.FlowNoiser and
    nn.CosineAlignLoss (one tuple of names, one schedule list)."""
    assert SEM_TARGETS is SEMANTIC_TARGETS and NOISE_SCHEDULES is schedules.TOKENIZER_SCHEDULES
    torch.manual_seed(8)
    m = _small().train()
    assert isinstance(m.noiser, FlowNoiser) and isinstance(m.sem_criterion, CosineAlignLoss)
    assert m.noiser.shift == m.timestep_shift == schedules.default_shift(m.grid, m.token_channels)
    assert not list(m.noiser.parameters()) and not list(m.sem_criterion.parameters())
    calls = []
    m.noiser.register_forward_hook(lambda mod, args, kw, out: calls.append(("noiser", kw)), with_kwargs=True)
    m.sem_criterion.register_forward_hook(lambda mod, args, out: calls.append(("sem", args)))
    B, N = 2, 16
    x = torch.rand(B, 3, 64, 64) * 2 - 1
    feats = {"tiny": torch.randn(B, N, 16)}
    mask = m.sample_mask(B, num_kept=10)
    out = m(x, mask=mask, seed=1234, flow_backend="reference", teacher_features=feats)
    assert [c[0] for c in calls] == ["noiser", "sem"]
    assert calls[0][1] == {"noise": None, "seed": 1234, "sample_offset": 0, "backend": "reference", "return_z": False}
    # the same draw of t and of the seeded noise as the module called directly
    torch.manual_seed(9)
    out = m(x, mask=mask, seed=1234, flow_backend="reference", teacher_features=feats)
    torch.manual_seed(9)
    t = schedules.sample_time(B, "shift", shift=m.timestep_shift)
    direct = m.noiser(m.encode(x, mask.ids_keep), t, seed=1234, backend="reference")
    torch.testing.assert_close(out.t, direct.t)
    torch.testing.assert_close(out.z_t, direct.z_t)
    torch.testing.assert_close(out.kl, direct.kl.mean())
    torch.testing.assert_close(out.sem_loss, m.sem_criterion(out.sem_pred["tiny"], feats["tiny"], out.token_mask))


def test_flow_noiser_noise_seed_and_sample_offset():
    """FlowNoiser(noise=) is the reference given that noise; (seed=, sample_offset=) on the Triton path
    gives a slice of a global batch the rows of the whole batch (the trainers' kernel-noise mode)."""
    B, N, C = 4, 9, 6
    moments, t = torch.randn(B, N, 2 * C), torch.rand(B)
    e1, e2 = torch.randn(B, N, C), torch.randn(B, N, C)
    noiser = FlowNoiser(gamma=1.0, shift=2.0).train()
    out = noiser(moments, t, noise=(e1, e2))
    ref = posterior_flow(moments, t, 1.0, noise=(e1, e2), backend="reference")
    torch.testing.assert_close(out.z, ref[0])
    torch.testing.assert_close(out.z_t, ref[1])
    full = noiser(moments, t, seed=77, backend="triton")
    part = noiser(moments[2:], t[2:], seed=77, sample_offset=2, backend="triton")
    assert torch.equal(part.z_t, full.z_t[2:]) and torch.equal(part.z, full.z[2:])
    with pytest.raises(ValueError, match="sample_offset"):
        noiser(moments, t, noise=(e1, e2), sample_offset=1)


def test_gamma_zero_still_samples_the_posterior():
    """Stage 2 (γ = 0): no flow noise, but ``z = mean + std·eps_post`` is a posterior sample."""
    torch.manual_seed(6)
    m = _small(gamma=0.0, mask_ratio=0.0, mask_ratio_min=0.0).train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    e1, e2 = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    out = m(x, mask=Mask(None, None), noise=(e1, e2))
    moments = m.encode(x)
    mean, logvar = moments[..., :8], moments[..., 8:].clamp(-30, 20)
    torch.testing.assert_close(out.z, mean + torch.exp(0.5 * logvar) * e1)
    assert not torch.allclose(out.z, mean)
    torch.testing.assert_close(out.z_t, out.z)
    assert out.t is None


@pytest.mark.parametrize("target", ["reconstruction", "align"])
def test_semantic_targets(target):
    torch.manual_seed(4)
    m = _small(sem_target=target).train()
    B, N = 2, 16
    x = torch.rand(B, 3, 64, 64) * 2 - 1
    feats = {"tiny": torch.randn(B, N, 16)}
    mask = m.sample_mask(B, num_kept=10)
    out = m(x, mask=mask, teacher_features=feats)
    sel = out.token_mask if target == "reconstruction" else ~out.token_mask
    cos = torch.nn.functional.cosine_similarity(out.sem_pred["tiny"], feats["tiny"], dim=-1)
    torch.testing.assert_close(out.sem_loss, (1 - cos)[sel].mean(), atol=1e-5, rtol=1e-5)
    full = m(x, mask=m.sample_mask(B, num_kept=N), teacher_features=feats)
    if target == "reconstruction":
        assert full.sem_loss.item() == 0.0  # nothing masked: zero loss
    else:
        assert full.sem_loss.item() > 0.0


def test_gamma_zero_clean_semantic_input_and_schedules():
    torch.manual_seed(5)
    m = _small(gamma=0.0, sem_input_type="clean", mask_ratio=0.0, mask_ratio_min=0.0).train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = m(x)  # mask_ratio 0: no masking
    assert out.ids_keep is None and out.t is None
    masked = m(x, mask=m.sample_mask(2, num_kept=12))
    assert masked.z.shape == (2, 12, 8)
    torch.testing.assert_close(out.z_t, out.z)
    m2 = _small(sem_input_type="clean").train()
    out2 = m2(x, mask=m2.sample_mask(2, num_kept=12))
    torch.testing.assert_close(out2.sem_pred["tiny"], m2.predict_teacher_features(out2.z, out2.ids_restore))
    assert not torch.allclose(out2.z, out2.z_t)
    for sched in ("uniform", "lognorm", "shift"):
        o = _small(noise_schedule=sched).train()(x)
        assert o.t.shape == (2,) and ((o.t >= 0) & (o.t <= 1)).all()
    with pytest.raises(ValueError, match="noise_schedule"):
        RecTokConfig(noise_schedule="cosine")


def test_attached_teachers_and_validation():
    m = _small(teachers={"tiny": 16}).train()
    m.attach_teachers({"tiny": TinyTeacher(width=16, depth=1, heads=2)})
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = m(x)
    assert out.teacher_features["tiny"].shape == (2, 16, 16) and out.sem_loss.ndim == 0
    with pytest.warns(DeprecationWarning, match="teacher_features"):
        assert out.sem_target is out.teacher_features  # the old name: a warning alias
    with pytest.raises(ValueError, match="width"):
        m.attach_teachers({"tiny": TinyTeacher(width=8, depth=1, heads=2)})
    with pytest.raises(KeyError):
        m.attach_teachers({"dinov2": TinyTeacher(width=16, depth=1, heads=2)})
    with pytest.raises(ValueError, match="128px|64px"):
        m.eval().encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, K, C\)"):
        m.decode(torch.zeros(8, 16))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda_only
def test_golden_on_cuda_fp32_and_bf16(golden):
    m = RecTok.from_official(golden["state_dict"]).cuda()
    x, o = golden["inputs"]["images"].cuda(), golden["outputs"]
    C = m.token_channels
    with torch.no_grad():
        moments = m.encode(x)
        assert rel(moments.cpu(), o["moments"]) <= 1e-4
        assert rel(m.decode(moments[..., :C]).cpu(), o["decoded_from_mean"]) <= 1e-4
        ids_keep, ids_restore = o["ids_keep"].cuda(), o["ids_restore"].cuda()
        z_vis = torch.gather(o["moments"][..., :C].cuda(), 1, ids_keep[..., None].expand(-1, -1, C))
        assert rel(m.decode(z_vis, ids_restore).cpu(), o["decoded_masked"]) <= 1e-4
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mb = m.encode(x)
        assert rel(mb.float().cpu(), o["moments"]) <= 5e-2
    m.train()
    feats = {"dinov3": torch.randn(3, 64, 64, device="cuda")}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x, teacher_features=feats)
        loss = (out.reconstruction.float() - x).pow(2).mean() + 1e-6 * out.kl + out.sem_loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
