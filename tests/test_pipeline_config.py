"""Configs: YAML + overrides, every recipe parses and instantiates (meta device for paper sizes),
learning-rate schedules and AdamW parameter groups of method §3."""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch

from rectok_fast.config import (
    RunConfig,
    config_dir,
    load_config,
    lr_for,
    parse_overrides,
    resolve_config_path,
    total_steps,
)
from rectok_fast.train.builders import build_ditdh, build_rectok
from rectok_fast.utils.optim import build_param_groups, lr_at

RECIPES = sorted(glob.glob(os.path.join(config_dir(), "*", "*.yaml")))


def test_recipes_exist():
    names = {os.path.relpath(p, config_dir()) for p in RECIPES}
    for want in (
        "tokenizer/rectok_bb_stage1.yaml",
        "tokenizer/rectok_bb_stage2.yaml",
        "tokenizer/tiny.yaml",
        "dit/ditdh_xl.yaml",
        "dit/ditdh_s.yaml",
        "dit/tiny.yaml",
    ):
        assert want in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, config_dir()))
def test_every_recipe_instantiates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    with torch.device("meta"):
        if cfg.kind == "tokenizer":
            model = build_rectok(cfg.model, cfg.data.image_size)
            assert model.config.token_channels == cfg.model.latent_channels
        else:
            grid = 16 if cfg.model.latent_channels == 128 else 4
            model = build_ditdh(cfg.model, cfg.model.latent_channels, grid, cfg.model.num_classes)
    n = sum(p.numel() for p in model.parameters())
    assert n > 0


def test_paper_sizes_and_hyperparameters():
    s1 = load_config(resolve_config_path("tokenizer/rectok_bb_stage1"))
    s2 = load_config(resolve_config_path("tokenizer/rectok_bb_stage2"))
    xl = load_config(resolve_config_path("dit/ditdh_xl"))
    s = load_config(resolve_config_path("dit/ditdh_s"))
    assert lr_for(s1.optim, s1.data.global_batch_size) == pytest.approx(4e-4)
    assert (s1.optim.betas, s1.optim.weight_decay, s1.optim.warmup_frac, s1.optim.grad_clip, s1.optim.ema_decay) == (
        (0.9, 0.95),
        1e-4,
        0.25,
        3.0,
        0.999,
    )
    assert (s1.loss.kl, s1.loss.gan, s1.loss.gan_start_epoch, s1.optim.epochs) == (1e-6, 0.1, 100, 200)  # method §3: GAN weight 0.1
    assert s2.stage == 2 and s2.loss.kl == 0 and s2.loss.semantic == 0 and s2.loss.gan_start_epoch == 0
    assert s2.model.extra["gamma"] == 0.0 and s2.model.extra["mask_ratio"] == 0.0 and s2.optim.warmup_frac == 0.05
    assert lr_for(s2.optim, 1024) == pytest.approx(2e-4) and s2.optim.epochs == 100
    assert (xl.optim.lr, xl.optim.min_lr, xl.optim.weight_decay, xl.optim.grad_clip, xl.optim.ema_decay) == (
        2e-4,
        2e-5,
        0.0,
        1.0,
        0.9995,
    )
    assert s.model.name == "S" and s.optim.epochs == 30
    with torch.device("meta"):
        tok = build_rectok(s1.model, 256)
        n_tok = sum(p.numel() for n, p in tok.named_parameters() if not n.startswith("sem_decoders"))
        n_xl = sum(p.numel() for p in build_ditdh(xl.model, 128, 16, 1000).parameters())
        n_s = sum(p.numel() for p in build_ditdh(s.model, 128, 16, 1000).parameters())
    assert n_tok / 1e6 == pytest.approx(172, rel=0.01)
    assert n_xl / 1e6 == pytest.approx(839, rel=0.01)
    assert n_s / 1e6 == pytest.approx(193, rel=0.01)


def test_overrides_and_errors(tmp_path):
    assert parse_overrides(["a.b=1", "c=[0.9, 0.95]", "d=null", "e=x"]) == {
        "a": {"b": 1},
        "c": [0.9, 0.95],
        "d": None,
        "e": "x",
    }
    cfg = load_config(
        resolve_config_path("tokenizer/tiny"),
        ["optim.blr=2e-4", "optim.betas=[0.8,0.9]", "model.extra.gamma=0.5", "max_steps=3"],
    )
    assert (
        cfg.optim.blr == 2e-4
        and cfg.optim.betas == (0.8, 0.9)
        and cfg.model.extra["gamma"] == 0.5
        and cfg.max_steps == 3
    )
    assert cfg.model.extra["mask_ratio"] == 0.4  # merged, not replaced
    with pytest.raises(KeyError, match="optim.blrr|blrr"):
        load_config(None, ["optim.blrr=1"])
    with pytest.raises(TypeError, match="data.image_size"):
        load_config(None, ["data.image_size=big"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["novalue"])
    p = tmp_path / "child.yaml"
    p.write_text(f"base: {resolve_config_path('dit/ditdh_xl')}\nmodel:\n  name: B\n")
    c = load_config(str(p))
    assert c.model.name == "B" and c.optim.lr == 2e-4


def test_lr_schedules():
    peak, total, warm = 1.0, 100, 25
    lrs = [lr_at(s, peak=peak, total=total, warmup=warm) for s in range(total)]
    assert lrs[0] == pytest.approx(1 / 25) and lrs[24] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[25:], lrs[26:]))  # cosine decays monotonically
    assert lr_at(total, peak=peak, total=total, warmup=warm) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(25 + 37, peak=peak, total=total, warmup=warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 37 / 75)))
    kw = dict(peak=2e-4, total=800, schedule="const_linear", min_lr=2e-5, decay_start=40, decay_end=800)
    assert lr_at(39, **kw) == 2e-4 and lr_at(420, **kw) == pytest.approx(1.1e-4) and lr_at(800, **kw) == 2e-5
    cfg = load_config(resolve_config_path("tokenizer/tiny"))
    assert total_steps(cfg.optim, 256) == 1024
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, peak=1, total=1, schedule="nope")


def test_param_groups_no_decay():
    cfg = load_config(resolve_config_path("tokenizer/tiny"))
    model = build_rectok(cfg.model, 64)
    groups = build_param_groups(model, 1e-4)
    decay = dict(zip(groups[0]["names"], groups[0]["params"]))
    no_decay = set(groups[1]["names"])
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        low = name.lower()
        expect_nd = (
            p.ndim <= 1
            or "positional_embedding" in low
            or "mask_token" in low
            or "mask_embedding" in low
            or "pos_embed" in low
        )
        if expect_nd:
            assert name in no_decay, name
    assert any(".qkv.weight" in n for n in decay) and all(p.ndim >= 2 for p in decay.values())
