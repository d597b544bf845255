"""DiT^DH: golden velocity, config inference from official checkpoints, sizes, save/load, training loss."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import reference_file, rel_err

from rectok_fast.models.ditdh import (
    DITDH_SIZES,
    DiTDH,
    DiTDHConfig,
    TimestepEmbedder,
    drop_labels,
    infer_ditdh_config,
    label_drop_mask,
    sincos_pos_embed,
    training_loss,
    training_time,
)
from rectok_fast.nn.rope import eva_rope_table

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def golden():
    return torch.load(reference_file("golden_ditdh_tiny.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def golden_model(golden):
    return DiTDH.from_official(golden["state_dict"])


def read_tsv(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in reference_file(name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def tiny(**kw) -> DiTDH:
    cfg = dict(in_channels=8, input_size=4, hidden_size=(32, 48), depth=(1, 1), num_heads=(2, 2), num_classes=5)
    cfg.update(kw)
    return DiTDH(**cfg)


# ----------------------------------------------------------------------------- golden


def test_golden_config_inferred(golden, golden_model):
    gc, c = golden["config"], golden_model.config
    assert c.hidden_size == tuple(gc["hidden_size"])
    assert c.depth == tuple(gc["depth"])
    assert c.num_heads == tuple(gc["num_heads"])
    assert c.num_classes == gc["num_classes"]
    assert c.in_channels == gc["token_channels"]
    assert c.input_size == gc["img_size"] // gc["tokenizer_patch_size"]
    assert c.mlp_ratio == gc["mlp_ratio"]
    assert not golden_model.training
    assert golden_model.default_shift == pytest.approx(golden["outputs"]["shift"].item())


def test_golden_velocity(golden, golden_model):
    i, o = golden["inputs"], golden["outputs"]
    with torch.no_grad():
        v = golden_model(i["x"], i["t"], i["y"])
    assert v.shape == o["velocity"].shape
    assert rel_err(v, o["velocity"]) <= 1e-5


def test_golden_velocity_math_attention(golden):
    model = DiTDH.from_official(golden["state_dict"], attn_backend="math")
    i, o = golden["inputs"], golden["outputs"]
    with torch.no_grad():
        assert rel_err(model(i["x"], i["t"], i["y"]), o["velocity"]) <= 1e-5


def test_from_official_checkpoint_forms(golden, tmp_path):
    """Path, {'model', 'model_ema'} dict (EMA chosen by use_ema), DDP/compile prefixes."""
    sd, ag = golden["state_dict"], golden["ag_state_dict"]
    ckpt = {"model": ag, "model_ema": sd, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    i = golden["inputs"]
    with torch.no_grad():
        ref = DiTDH.from_official(sd)(i["x"], i["t"], i["y"])
        ref_ag = DiTDH.from_official(ag)(i["x"], i["t"], i["y"])
        assert torch.equal(DiTDH.from_official(path)(i["x"], i["t"], i["y"]), ref)
        assert torch.equal(DiTDH.from_official(str(path), use_ema=False)(i["x"], i["t"], i["y"]), ref_ag)
        prefixed = {"module._orig_mod." + k: v for k, v in sd.items()}
        assert torch.equal(DiTDH.from_official({"model": prefixed})(i["x"], i["t"], i["y"]), ref)
    assert not torch.equal(ref, ref_ag)


def test_from_official_rejects_other_state_dicts(golden):
    with pytest.raises(ValueError, match="x_embedder"):
        DiTDH.from_official({"encoder.weight": torch.zeros(2)})
    sd = dict(golden["state_dict"])
    sd["blocks.9.norm1.weight"] = torch.ones(96)
    with pytest.raises(ValueError, match="contiguous"):
        DiTDH.from_official(sd)


def test_rope_table_matches_checkpoint(golden):
    sd = golden["state_dict"]
    for name, hd in (("enc_feat_rope", 24), ("dec_feat_rope", 32)):
        cos, sin = eva_rope_table(hd, 8)
        torch.testing.assert_close(cos, sd[f"{name}.freqs_cos"], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, sd[f"{name}.freqs_sin"], atol=1e-6, rtol=0)
    fresh = DiTDH(DiTDHConfig(**{**infer_ditdh_config(sd).to_dict()}))
    torch.testing.assert_close(fresh.enc_feat_rope.freqs_cos, sd["enc_feat_rope.freqs_cos"], atol=1e-6, rtol=0)


def test_pos_embed_formula(golden):
    """The golden model's pos_embed is the sin-cos table plus random perturbation (std ≈ 0.05):
    the formula must be within that noise, and the row/column-swapped table must not."""
    pe = golden["state_dict"]["pos_embed"][0]
    ours = sincos_pos_embed(96, 8)
    err = (ours - pe).abs()
    assert err.mean() < 0.06 and err.max() < 0.3
    swapped = torch.cat([ours[:, 48:], ours[:, :48]], dim=1)
    assert (swapped - pe).abs().mean() > 3 * err.mean()
    # Column index in the first half: token 1 is (row 0, col 1): first entry sin(1).
    assert ours[1, 0].item() == pytest.approx(math.sin(1.0))
    assert ours[8, 0].item() == 0.0 and ours[8, 48].item() == pytest.approx(math.sin(1.0))


def test_time_embedding_formula(golden):
    emb = TimestepEmbedder(96)
    emb.load_state_dict(
        {k[len("t_embedder.") :]: v for k, v in golden["state_dict"].items() if k.startswith("t_embedder.")}
    )
    t = golden["inputs"]["t"]
    W = golden["state_dict"]["t_embedder.W"]
    ang = 2 * math.pi * t[:, None].double() * W[None, :].double()
    torch.testing.assert_close(emb.fourier(t).double(), torch.cat([ang.sin(), ang.cos()], 1), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- paper sizes from the .tsv files


@pytest.mark.parametrize("size,tsv", [("S", "ditdh_s_ch128_state_dict.tsv"), ("XL", "ditdh_xl_ch128_state_dict.tsv")])
def test_fresh_model_has_checkpoint_layout(size, tsv):
    want = read_tsv(tsv)
    with torch.device("meta"):
        model = DiTDH.from_size(size, in_channels=128, input_size=16, num_classes=1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert model.default_shift == pytest.approx(math.sqrt(8))


def test_from_official_random_s_checkpoint():
    """A real (random-valued) DiT^DH-S state dict with the released key layout loads without a copy."""
    shapes = read_tsv("ditdh_s_ch128_state_dict.tsv")
    sd = {k: torch.empty(s) for k, s in shapes.items()}
    sd["y_embedder.embedding_table.weight"].normal_()
    model = DiTDH.from_official({"model_ema": sd, "model": {}})
    c = model.config
    assert (c.hidden_size, c.depth, c.num_heads) == tuple(
        tuple(DITDH_SIZES["S"][k]) for k in ("hidden_size", "depth", "num_heads")
    )
    assert (c.in_channels, c.input_size, c.num_classes, c.patch_size) == (128, 16, 1000, 1)
    assert model.y_embedder.embedding_table.weight.data_ptr() == sd["y_embedder.embedding_table.weight"].data_ptr()
    n = sum(v.numel() for v in model.state_dict().values())
    assert n == sum(math.prod(s) for s in shapes.values())
    assert 193e6 < n < 194e6


def test_from_official_xl_on_meta():
    """The 839M-parameter XL: meta tensors, nothing allocated."""
    sd = {k: torch.empty(s, device="meta") for k, s in read_tsv("ditdh_xl_ch128_state_dict.tsv").items()}
    model = DiTDH.from_official(sd)
    c = model.config
    assert c.hidden_size == (1152, 2048) and c.depth == (28, 2) and c.num_heads == (16, 16)
    assert c.num_classes == 1000 and c.in_channels == 128 and c.input_size == 16
    assert c.head_dims == (72, 128)
    assert all(p.is_meta for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters())
    assert 830e6 < trainable < 840e6


def test_infer_other_configurations():
    """Other grids, channels, widths, heads, class counts, qk-norm and patch size round-trip."""
    for kw in (
        dict(in_channels=16, input_size=6, hidden_size=(64, 96), depth=(3, 2), num_heads=(4, 3), num_classes=7),
        dict(in_channels=4, input_size=8, patch_size=2, hidden_size=(48, 64), depth=(2, 1), num_heads=(3, 2)),
        dict(in_channels=8, input_size=4, hidden_size=(32, 48), depth=(1, 1), num_heads=(2, 2), qk_norm=True),
        dict(in_channels=8, input_size=4, hidden_size=(32, 48), depth=(1, 1), num_heads=(2, 2), wo_shift=True),
    ):
        m = DiTDH(**kw).eval()
        m2 = DiTDH.from_official(m.state_dict())
        assert m2.config == m.config, kw
        x = torch.randn(2, m.in_channels, m.config.input_size, m.config.input_size)
        t, y = torch.rand(2), torch.tensor([0, m.num_classes])
        with torch.no_grad():
            torch.testing.assert_close(m2(x, t, y), m(x, t, y), rtol=0, atol=0)


def test_same_width_needs_depth_override():
    m = DiTDH(in_channels=8, input_size=4, hidden_size=(32, 32), depth=(2, 1), num_heads=(2, 2), num_classes=3)
    assert "s_projector.weight" not in m.state_dict()
    m2 = DiTDH.from_official(m.state_dict(), depth=(2, 1))
    assert m2.config == m.config
    with pytest.warns(UserWarning, match="depth"):
        DiTDH.from_official(m.state_dict())


# ----------------------------------------------------------------------------- save / load, dtypes, validation


def test_save_load_roundtrip(golden, golden_model, tmp_path):
    golden_model.save_pretrained(tmp_path / "m")
    m = DiTDH.from_pretrained(tmp_path / "m")
    assert m.config == golden_model.config
    i = golden["inputs"]
    with torch.no_grad():
        assert torch.equal(m(i["x"], i["t"], i["y"]), golden_model(i["x"], i["t"], i["y"]))


def test_bf16_forward_close(golden):
    i, o = golden["inputs"], golden["outputs"]
    m = DiTDH.from_official(golden["state_dict"]).to(torch.bfloat16)
    with torch.no_grad():
        v = m(i["x"].bfloat16(), i["t"], i["y"])
    assert v.dtype == torch.bfloat16
    assert rel_err(v.float(), o["velocity"]) < 3e-2


def test_scalar_time_broadcasts(golden_model, golden):
    x, y = golden["inputs"]["x"], golden["inputs"]["y"]
    with torch.no_grad():
        a = golden_model(x, 0.25, y)
        b = golden_model(x, torch.full((4,), 0.25), y)
        c = golden_model(x, torch.tensor(0.25), y)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_input_validation(golden_model):
    x = torch.randn(2, 128, 8, 8)
    t, y = torch.rand(2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="`x`"):
        golden_model(torch.randn(2, 64, 8, 8), t, y)
    with pytest.raises(TypeError, match="`y`"):
        golden_model(x, t, y.float())
    with pytest.raises(ValueError, match="`t`"):
        golden_model(x, torch.rand(3), y)
    with pytest.raises(ValueError, match="num_heads|divisible"):
        DiTDHConfig(hidden_size=(30, 48), num_heads=(4, 2))
    with pytest.raises(ValueError, match="unknown size"):
        DiTDH.from_size("XXL")


def test_fresh_model_starts_at_zero_velocity():
    m = tiny()
    v = m(torch.randn(3, 8, 4, 4), torch.rand(3), torch.tensor([0, 4, 5]))
    assert torch.count_nonzero(v) == 0


# ----------------------------------------------------------------------------- training objective


def test_training_time_schedule():
    torch.manual_seed(0)
    s = math.sqrt(8)
    t = training_time(20000, s)
    assert t.min() >= 0 and t.max() <= 1
    # t = 1 - s·u/(1+(s-1)u): median at u = 1/2.
    assert t.median().item() == pytest.approx(1 - s * 0.5 / (1 + (s - 1) * 0.5), abs=0.02)
    assert training_time(20000, 0.5).mean().item() == pytest.approx(0.5, abs=0.02)  # no shift for s <= 1
    # method §4: when s <= 1 the time is u itself (not 1 - u)
    u = torch.rand(64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(training_time(64, 0.5, generator=torch.Generator().manual_seed(4)), u)


def test_drop_labels():
    y = torch.arange(1000) % 7
    assert torch.equal(drop_labels(y, 7, 0.0), y)
    assert torch.all(drop_labels(y, 7, 1.0) == 7)
    d = drop_labels(y, 7, 0.1)
    frac = (d == 7).float().mean().item()
    assert 0.06 < frac < 0.14
    assert torch.equal(d[d != 7], y[d != 7])


def test_label_drop_mask_and_explicit_mask():
    g = torch.Generator().manual_seed(2)
    mask = label_drop_mask(8, 0.5, generator=g)
    assert mask.dtype == torch.bool and torch.equal(mask, torch.rand(8, generator=torch.Generator().manual_seed(2)) < 0.5)
    assert not label_drop_mask(8, 0.0).any()  # still one draw per sample, none dropped
    y = torch.arange(8) % 3
    assert torch.equal(drop_labels(y, 3, mask=mask), torch.where(mask, 3, y))
    assert torch.equal(drop_labels(y, 3, 0.0, mask=mask), torch.where(mask, 3, y))  # the mask wins over p


def test_training_loss_default_time_is_training_time():
    """``t`` defaults to schedules.training_time(B, model.default_shift): t = u for this s < 1 model."""
    m = tiny()
    assert m.default_shift < 1
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    x1, x0, y = torch.randn(6, 8, 4, 4), torch.randn(6, 8, 4, 4), torch.zeros(6, dtype=torch.long)
    torch.manual_seed(11)
    training_loss(m, x1, y, noise=x0, label_drop=0.0)
    torch.manual_seed(11)
    assert torch.equal(seen[0], torch.rand(6))


def test_training_loss_drop_mask_offset_and_autocast():
    """The trainer's inputs: an explicit drop mask, ``sample_offset`` with a seed, the model call
    (only) under the given context."""
    from rectok_fast.ops import flow_matching_noise

    torch.manual_seed(3)
    m = tiny()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    B = 6
    x1, y, t = torch.randn(B, 8, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0]), torch.rand(B)
    drop = torch.tensor([True, False, True, False, False, True])
    seen = []
    m.y_embedder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    x0 = torch.randn(B, 8, 4, 4)
    a = training_loss(m, x1, y, t=t, noise=x0, drop_mask=drop, label_drop=0.0)
    assert torch.equal(seen[-1], torch.where(drop, 5, y))
    yy = torch.where(drop, 5, y)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(a, (m(tt * x1 + (1 - tt) * x0, t, yy) - (x1 - x0)).pow(2).mean())
    # rows 2: of a global batch with seed 9: the x0 of global rows 2: (Triton path; interpreter on CPU)
    x0_full = flow_matching_noise(9, (B, 8, 4, 4), "cpu")
    part = training_loss(m, x1[2:], y[2:], t=t[2:], seed=9, sample_offset=2, drop_mask=drop[2:], backend="triton")
    ref = training_loss(m, x1[2:], y[2:], t=t[2:], noise=x0_full[2:], drop_mask=drop[2:], backend="reference")
    torch.testing.assert_close(part, ref, rtol=1e-5, atol=1e-6)

    class Ctx:
        inside = False

        def __enter__(self):
            Ctx.inside = True

        def __exit__(self, *exc):
            Ctx.inside = False

    flags = []
    m.register_forward_pre_hook(lambda mod, args: flags.append(Ctx.inside))
    m.y_embedder.register_forward_hook(lambda mod, inp, out: flags.append(Ctx.inside))
    b = training_loss(m, x1, y, t=t, noise=x0, drop_mask=drop, autocast=Ctx())
    assert flags == [True, True] and not Ctx.inside
    torch.testing.assert_close(a, b)


def test_training_loss_matches_manual():
    torch.manual_seed(1)
    m = tiny()
    for p in m.parameters():  # leave the zero init so the prediction is non-trivial
        torch.nn.init.normal_(p, std=0.05)
    x1, y = torch.randn(3, 8, 4, 4), torch.tensor([0, 1, 4])
    t, x0 = torch.rand(3), torch.randn(3, 8, 4, 4)
    loss = training_loss(m, x1, y, t=t, noise=x0, label_drop=0.0)
    tt = t.view(-1, 1, 1, 1)
    manual = (m(tt * x1 + (1 - tt) * x0, t, y) - (x1 - x0)).pow(2).mean()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    trainable = dict(m.named_parameters())
    assert "t_embedder.W" not in trainable and "pos_embed" not in trainable  # fixed, never trained


def test_training_loss_label_drop_uses_null_class():
    m = tiny()
    seen = []
    m.y_embedder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    training_loss(m, torch.randn(64, 8, 4, 4), torch.zeros(64, dtype=torch.long), label_drop=0.5)
    ys = seen[0]
    assert set(ys.unique().tolist()) == {0, 5}


def test_training_reduces_loss():
    """A few dozen AdamW steps on a fixed batch of class-dependent latents lower the loss."""
    torch.manual_seed(0)
    m = tiny().train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    y = torch.arange(8) % 5
    x1 = torch.randn(5, 8, 4, 4)[y] * 0.3 + 1.0
    losses = []
    for _ in range(40):
        loss = training_loss(m, x1, y, label_drop=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_training_loss_and_sampling_through_a_ddp_style_wrapper(golden):
    """DDP/FSDP wrappers expose the model as ``.module``: shift, null class and labels come from it."""
    from rectok_fast.sampling import sample

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

        def forward(self, *args):
            return self.module(*args)

    m = tiny()
    x1, y, t, x0 = torch.randn(2, 8, 4, 4), torch.tensor([1, 2]), torch.rand(2), torch.randn(2, 8, 4, 4)
    a = training_loss(Wrapper(m), x1, y, t=t, noise=x0, label_drop=0.0)
    torch.testing.assert_close(a, training_loss(m, x1, y, t=t, noise=x0, label_drop=0.0))
    g = DiTDH.from_official(golden["state_dict"])
    o, yy = golden["outputs"], golden["inputs"]["y"]
    out = sample(Wrapper(g), o["sample_noise"], yy, 8, guidance="cfg", scale=1.7)
    assert rel_err(out, o["sample_euler_cfg"]) <= 1e-5
