"""Teachers: on-device preprocessing, token dropping, TinyTeacher, and the missing-weights errors.

The real backbones (timm / transformers) are never downloaded here: the wrappers are exercised with
small stand-in modules of the same interface."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rectok_fast.models import TinyTeacher, load_teacher
from rectok_fast.models.teachers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DINOv2Teacher,
    DINOv3Teacher,
    SigLIPTeacher,
    TeacherUnavailableError,
)


class _FakeTimmViT(nn.Module):
    """timm-like: patch_embed.patch_size, num_features, num_prefix_tokens, forward_features."""

    def __init__(self, patch: int, width: int, prefix: int):
        super().__init__()
        self.patch_embed = SimpleNamespace(patch_size=(patch, patch))
        self.num_features, self.num_prefix_tokens = width, prefix
        self.proj = nn.Conv2d(3, width, patch, patch)
        self.seen = None

    def forward_features(self, x):
        self.seen = x
        tok = self.proj(x).flatten(2).transpose(1, 2)
        prefix = torch.full((x.shape[0], self.num_prefix_tokens, tok.shape[-1]), 99.0, dtype=tok.dtype)
        return torch.cat([prefix, tok], 1)


class _FakeHFDinoV3(nn.Module):
    def __init__(self, width: int = 12, registers: int = 4):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=width, patch_size=16, num_register_tokens=registers)
        self.proj = nn.Conv2d(3, width, 16, 16)
        self.seen = None

    def forward(self, pixel_values):
        self.seen = pixel_values
        tok = self.proj(pixel_values).flatten(2).transpose(1, 2)
        prefix = torch.full((tok.shape[0], 1 + self.config.num_register_tokens, tok.shape[-1]), 99.0)
        return SimpleNamespace(last_hidden_state=torch.cat([prefix, tok], 1))


def _images(B=2, size=64):
    return torch.rand(B, 3, size, size) * 2 - 1


def test_tiny_teacher_interface():
    t = TinyTeacher(width=24, depth=1, heads=2)
    x = _images()
    out = t(x)
    assert out.shape == (2, 16, 24) and t.width == 24 and t.patch_size == 16
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training
    torch.testing.assert_close(TinyTeacher(width=24, depth=1, heads=2)(x), out)  # seeded init
    t14 = TinyTeacher(width=24, depth=1, heads=2, patch_size=14)
    assert t14(x).shape == (2, 16, 24)  # resized to 4·14 so the grid matches the tokenizer's


def test_dinov2_wrapper_resizes_normalises_and_drops_prefix():
    fake = _FakeTimmViT(patch=14, width=10, prefix=5)  # CLS + 4 registers
    t = DINOv2Teacher(fake)
    x = _images(size=64)
    out = t(x)
    assert out.shape == (2, 16, 10) and (out != 99.0).all()
    assert fake.seen.shape == (2, 3, 56, 56)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    want = (F.interpolate((x + 1) / 2, size=(56, 56), mode="bilinear", align_corners=False) - mean) / std
    torch.testing.assert_close(fake.seen, want)


def test_dinov3_wrapper_drops_cls_and_registers():
    fake = _FakeHFDinoV3(width=12, registers=4)
    t = DINOv3Teacher(fake)
    x = _images(size=32)
    out = t(x)
    assert out.shape == (2, 4, 12) and (out != 99.0).all() and t.width == 12
    assert fake.seen.shape == (2, 3, 32, 32)  # patch 16: no resize
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(fake.seen, ((x + 1) / 2 - mean) / std)


def test_siglip_normalisation():
    fake = _FakeTimmViT(patch=16, width=8, prefix=0)
    t = SigLIPTeacher(fake)
    x = _images(size=32)
    assert t(x).shape == (2, 4, 8)
    torch.testing.assert_close(fake.seen, x)  # mean = std = 0.5 maps [0, 1] back to [-1, 1]


def test_bf16_teacher_keeps_fp32_constants():
    t = load_teacher("tiny", dtype=torch.bfloat16, width=16, depth=1, heads=2)
    assert t.pixel_mean.dtype == torch.float32 and t.compute_dtype == torch.bfloat16
    out = t(_images())
    assert out.dtype == torch.bfloat16
    ref = TinyTeacher(width=16, depth=1, heads=2)(_images())
    assert ref.dtype == torch.float32


@pytest.mark.parametrize("name,package", [("dinov2", "timm"), ("siglip", "timm"), ("dinov3", "transformers")])
def test_missing_package_message(monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(TeacherUnavailableError) as e:
        load_teacher(name)
    msg = str(e.value)
    assert f"`{package}`" in msg and "pip install 'rectok_fast[teachers]'" in msg
    assert "local directory" in msg and "TinyTeacher" in msg


def test_missing_local_weights_message(tmp_path):
    with pytest.raises(TeacherUnavailableError, match="no weights at"):
        load_teacher("dinov3", str(tmp_path / "nowhere"))
    with pytest.raises(TeacherUnavailableError, match="no weights at"):
        load_teacher("dinov2", "./definitely/not/here")
    with pytest.raises(ValueError, match="unknown teacher"):
        load_teacher("clip-xxl")


def test_load_teacher_grid_follows_tokenizer_patch():
    """A teacher serving a patch-8 tokenizer returns the (H/8)·(W/8) grid (DINOv2-style resizing included)."""
    from rectok_fast.models.teachers import load_teacher

    t = load_teacher("tiny", tokenizer_patch=8, width=16, depth=1, heads=2, patch_size=8)
    assert t.tokenizer_patch == 8
    assert t(torch.rand(2, 3, 32, 48) * 2 - 1).shape == (2, 4 * 6, 16)
    assert load_teacher("tiny", width=16, depth=1, heads=2).tokenizer_patch == 16
