"""The real teacher-loading path: timm DINOv2 / SigLIP and transformers DINOv3 through ``load_teacher``.

Small randomly initialised models of the real architectures are saved to a temporary directory in
the layout of the hub snapshots (timm: ``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``;
transformers: ``save_pretrained``) and loaded back with ``load_teacher``; the teacher's output is
compared with the backbone's own forward on independently preprocessed inputs.  Nothing downloads:
the hub is switched offline and sockets refuse to connect."""

from __future__ import annotations

import json
import os
import socket

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it (the fixture below covers late imports)
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rectok_fast.models.teachers import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    DINOv2Teacher,
    DINOv3Teacher,
    SigLIPTeacher,
    TeacherUnavailableError,
    load_teacher,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("test_teachers_real: network access is not allowed")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass


@pytest.fixture
def timm():
    return pytest.importorskip("timm", reason="timm is not installed (pip install 'rectok_fast[teachers]')")


@pytest.fixture
def transformers():
    mod = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install 'rectok_fast[teachers]')"
    )
    if not hasattr(mod, "DINOv3ViTConfig"):
        pytest.skip(f"transformers {mod.__version__} has no DINOv3 (needs >= 4.56)")
    return mod


def _images(B=2, H=64, W=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, W, generator=g) * 2 - 1


def _normalise(x, size, mean, std):
    """[-1, 1] -> [0, 1] -> bilinear resize to `size` -> (x - mean) / std, written out independently."""
    x = (x + 1) / 2
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _check_frozen(t):
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not any(m.training for m in t.modules())


# ----------------------------------------------------------------------------- DINOv3 (transformers)


def _save_dinov3(transformers, path, registers=4, preprocessor=None):
    torch.manual_seed(0)
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=16,
        num_register_tokens=registers,
        image_size=64,
    )
    model = transformers.DINOv3ViTModel(cfg).eval()
    model.save_pretrained(path)
    if preprocessor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


@pytest.mark.parametrize("registers", [4, 0])
def test_dinov3_from_save_pretrained(transformers, tmp_path, registers):
    hf = _save_dinov3(transformers, tmp_path, registers=registers)
    t = load_teacher("dinov3", str(tmp_path))
    assert isinstance(t, DINOv3Teacher) and t.width == 32 and t.patch_size == 16
    assert t.num_prefix_tokens == 1 + registers
    _check_frozen(t)
    x = _images(H=64, W=48)
    out = t(x)
    assert out.shape == (2, 4 * 3, 32) and out.dtype == torch.float32
    with torch.no_grad():
        full = hf(pixel_values=_normalise(x, (64, 48), IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state
    assert full.shape[1] == 1 + registers + 12
    torch.testing.assert_close(out, full[:, 1 + registers :], rtol=1e-5, atol=1e-5)


def test_dinov3_bf16_and_snapshot_normalisation(transformers, tmp_path):
    mean, std = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)  # DINOv3's satellite statistics
    hf = _save_dinov3(transformers, tmp_path, preprocessor={"image_mean": list(mean), "image_std": list(std)})
    x = _images(H=32, W=32)
    with torch.no_grad():
        want = hf(pixel_values=_normalise(x, (32, 32), mean, std)).last_hidden_state[:, 5:]
    t32 = load_teacher("dinov3", str(tmp_path))
    torch.testing.assert_close(t32(x), want, rtol=1e-5, atol=1e-5)  # read from preprocessor_config.json
    t = load_teacher("dinov3", str(tmp_path), dtype=torch.bfloat16)
    assert t.compute_dtype == torch.bfloat16 and t.pixel_mean.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in t.parameters())
    out = t(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 32)
    cos = F.cosine_similarity(out.float(), want, dim=-1)
    assert cos.min() > 0.98, cos.min()


def test_dinov3_bad_snapshot_raises_how_to(transformers, tmp_path):
    (tmp_path / "config.json").write_text("{}")  # no model_type, no weights
    with pytest.raises(TeacherUnavailableError, match="could not load") as e:
        load_teacher("dinov3", str(tmp_path))
    assert "load_teacher('dinov3', '/path/to/dir')" in str(e.value)


# ----------------------------------------------------------------------------- DINOv2 / SigLIP (timm)


def _save_timm(timm, path, arch, model_args, *, fmt="safetensors", wrap=None):
    """A timm hub-snapshot-like directory: config.json (architecture, num_classes, model_args) + weights."""
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, dynamic_img_size=True, **model_args).eval()
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": arch, "num_classes": model.num_classes, "num_features": model.num_features}
    cfg["model_args"] = model_args
    (path / "config.json").write_text(json.dumps(cfg))
    sd = model.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path / "model.safetensors"))
    else:
        torch.save({wrap: sd} if wrap else sd, str(path / "pytorch_model.bin"))
    return model


_DINOV2_ARGS = dict(depth=1, embed_dim=32, num_heads=2, img_size=56)


@pytest.mark.parametrize(
    "arch,prefix", [("vit_small_patch14_dinov2", 1), ("vit_small_patch14_reg4_dinov2", 5)], ids=["cls", "reg4"]
)
def test_dinov2_timm_snapshot(timm, tmp_path, arch, prefix):
    ref = _save_timm(timm, tmp_path, arch, _DINOV2_ARGS)
    t = load_teacher("dinov2", str(tmp_path))
    assert isinstance(t, DINOv2Teacher) and t.width == 32 and t.patch_size == 14
    assert t.num_prefix_tokens == prefix
    _check_frozen(t)
    x = _images(H=64, W=48)  # tokenizer grid 4x3 -> the teacher sees 56x42
    out = t(x)
    assert out.shape == (2, 12, 32) and out.dtype == torch.float32
    with torch.no_grad():
        full = ref.forward_features(_normalise(x, (56, 42), IMAGENET_MEAN, IMAGENET_STD))
    assert full.shape[1] == prefix + 12
    torch.testing.assert_close(out, full[:, prefix:], rtol=1e-5, atol=1e-5)


def test_dinov2_wrapped_bin_checkpoint_and_bf16(timm, tmp_path):
    # a pytorch_model.bin holding {"model_state_dict": ...} (the upstream offline layout)
    ref = _save_timm(timm, tmp_path, "vit_small_patch14_dinov2", _DINOV2_ARGS, fmt="bin", wrap="model_state_dict")
    x = _images(H=32, W=32)
    with torch.no_grad():
        want = ref.forward_features(_normalise(x, (28, 28), IMAGENET_MEAN, IMAGENET_STD))[:, 1:]
    torch.testing.assert_close(load_teacher("dinov2", str(tmp_path))(x), want, rtol=1e-5, atol=1e-5)
    t = load_teacher("dinov2", str(tmp_path / "pytorch_model.bin"), dtype=torch.bfloat16)  # a file works too
    assert t.compute_dtype == torch.bfloat16 and t.pixel_mean.dtype == torch.float32
    out = t(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 32)
    assert F.cosine_similarity(out.float(), want, dim=-1).min() > 0.98


def test_dinov2_original_meta_checkpoint(timm, tmp_path):
    """Weights in Meta's own DINOv2 key layout (with mask_token) go through timm's converter."""
    ref = _save_timm(timm, tmp_path, "vit_small_patch14_dinov2", _DINOV2_ARGS, fmt="bin")
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    sd["mask_token"] = torch.zeros(1, 32)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    x = _images(H=32, W=32)
    with torch.no_grad():
        want = ref.forward_features(_normalise(x, (28, 28), IMAGENET_MEAN, IMAGENET_STD))[:, 1:]
    torch.testing.assert_close(load_teacher("dinov2", str(tmp_path))(x), want, rtol=1e-5, atol=1e-5)


def test_timm_weights_that_do_not_fit_raise_how_to(timm, tmp_path):
    _save_timm(timm, tmp_path, "vit_small_patch14_dinov2", _DINOV2_ARGS)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_args"] = {**cfg["model_args"], "depth": 2}  # the config says 2 blocks, the weights have 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherUnavailableError, match="do not fit") as e:
        load_teacher("dinov2", str(tmp_path))
    assert "config.json" in str(e.value) and "TinyTeacher" in str(e.value)
    with pytest.raises(TeacherUnavailableError, match="could not build"):
        load_teacher("dinov2", str(tmp_path), arch="not_a_timm_model")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(TeacherUnavailableError, match="no weights at"):
        load_teacher("dinov2", str(tmp_path))


def test_siglip_timm_snapshot(timm, tmp_path):
    args = dict(depth=1, embed_dim=32, num_heads=2, img_size=64)
    ref = _save_timm(timm, tmp_path, "vit_base_patch16_siglip_256", args)
    t = load_teacher("siglip", str(tmp_path))
    assert isinstance(t, SigLIPTeacher) and t.width == 32 and t.patch_size == 16
    assert t.num_prefix_tokens == 0
    _check_frozen(t)
    for H, W in ((64, 64), (48, 32)):  # the native grid and an interpolated one
        x = _images(H=H, W=W)
        out = t(x)
        assert out.shape == (2, (H // 16) * (W // 16), 32)
        with torch.no_grad():
            want = ref.forward_features(x)  # mean = std = 0.5: the [-1, 1] image itself
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
