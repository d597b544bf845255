"""Tiny configurations shared by the pipeline tests (fast on a 2-core CPU)."""

from __future__ import annotations

import torch

from rectok_fast.config import RunConfig, load_config, resolve_config_path
from rectok_fast.data.latents import ShardWriter, write_latent_cache


def tiny_tokenizer_cfg(out: str, **over) -> RunConfig:
    """A RecTok with 1-block width-64 trunks on 32-px embedded crops (2×2 tokens of 8 channels)."""
    base = {
        "out": out,
        "device": "cpu",
        "data": {"image_size": 32, "global_batch_size": 4, "embedded_len": 64, "embedded_scale": 0.25},
        "model": {
            "latent_channels": 8,
            "extra": {
                "encoder": [64, 1, 2],
                "decoder": [64, 1, 2],
                "sem_decoder": [32, 1, 2],
                "teacher_width": 32,
                "patch_size": 16,
            },
        },
        "optim": {"total_steps": 50, "warmup_steps": 2, "amp": "none"},
        "loss": {"gan_start_epoch": 0, "disc_channels": 8, "disc_layers": 2},
        "log": {"log_every": 2, "ckpt_every": 1000, "keep_last": 2, "image_every": 0, "progress": False},
    }
    return load_config(resolve_config_path("tokenizer/tiny"), _merge(base, over))


def tiny_dit_cfg(out: str, latents: str, **over) -> RunConfig:
    base = {
        "out": out,
        "device": "cpu",
        "data": {"latents": latents, "global_batch_size": 8},
        "model": {
            "latent_channels": 8,
            "num_classes": 4,
            "extra": {"hidden_size": [32, 48], "depth": [1, 1], "num_heads": [2, 2]},
        },
        "optim": {"total_steps": 50, "warmup_steps": 2, "amp": "none"},
        "log": {"log_every": 2, "ckpt_every": 1000, "keep_last": 2, "image_every": 0, "progress": False},
    }
    return load_config(resolve_config_path("dit/tiny"), _merge(base, over))


def _merge(a: dict, b: dict) -> dict:
    from rectok_fast.config import merge

    return merge(a, b)


def synthetic_latent_cache(
    path: str, n: int = 64, grid: int = 2, channels: int = 8, num_classes: int = 4, seed: int = 0
) -> str:
    """A latent cache of structured random moments (class-dependent means, small variances)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    centers = torch.randn(num_classes, grid * grid, channels, generator=g)
    mean = centers[labels] + 0.1 * torch.randn(n, grid * grid, channels, generator=g)
    logvar = torch.full_like(mean, -6.0)
    w = ShardWriter(path, shard_size=n // 2 + 1)
    w.add(torch.cat([mean, logvar], -1), labels)
    w.flush()
    write_latent_cache(
        path,
        w.shards,
        grid=grid,
        channels=channels,
        mean=mean.mean((0, 1)),
        std=mean.std((0, 1)),
        meta={"num_classes": num_classes},
    )
    return path


def state_of(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
