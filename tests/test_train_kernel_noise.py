"""Trainers with ``noise: kernel``: the fused ops generate the loss noise in-kernel from one shared
seed per step plus each micro-batch's global sample offset (Triton interpreter on the CPU)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from pipeline_helpers import synthetic_latent_cache, tiny_dit_cfg, tiny_tokenizer_cfg

import rectok_fast
from rectok_fast.data.sampler import set_loader_epoch
from rectok_fast.ops import flow_matching_noise, flow_noise
from rectok_fast.train.common import resolve_noise_mode
from rectok_fast.train.dit import DiTTrainer
from rectok_fast.train.tokenizer import TokenizerTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resolve_noise_mode():
    assert resolve_noise_mode("auto", torch.device("cpu")) == "materialized"
    assert resolve_noise_mode("auto", torch.device("cuda", 0)) == "kernel"
    assert resolve_noise_mode("kernel", torch.device("cpu")) == "kernel"
    assert resolve_noise_mode("materialized", torch.device("cuda", 0)) == "materialized"
    with pytest.raises(ValueError, match="noise"):
        resolve_noise_mode("fused", torch.device("cpu"))


def test_dit_kernel_noise_two_steps_matches_materialized_given_the_same_x0(tmp_path, kernel_device):
    lat = synthetic_latent_cache(str(tmp_path / "lat"), n=16)
    over = {"device": kernel_device, "data": {"global_batch_size": 8, "grad_accum": 2}, "optim": {"lr": 3e-3}}
    cfg = tiny_dit_cfg(str(tmp_path / "k"), lat, noise="kernel", max_steps=2, **over)
    tr = DiTTrainer(cfg)
    assert tr.noise_mode == "kernel"
    tr.fit()
    assert rectok_fast.last_backend("flow_matching_loss") == "triton"
    losses = [json.loads(x)["loss"] for x in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert len(losses) == 1 and math.isfinite(losses[0]), losses

    # One step by hand: kernel mode (seed + sample offsets 0 and 4) against materialized mode given the
    # x0 that the seed stands for: the whole global batch's in-kernel x0.
    k = DiTTrainer(tiny_dit_cfg(str(tmp_path / "k2"), lat, noise="kernel", **over))
    m = DiTTrainer(tiny_dit_cfg(str(tmp_path / "m2"), lat, noise="materialized", **over))
    rnd_k = k.draw_step_randomness(k.global_batch)
    assert "x0" not in rnd_k and rnd_k["seed"].dtype == torch.int64
    x0 = flow_matching_noise(rnd_k["seed"], (k.global_batch, k.channels, k.grid, k.grid), kernel_device)
    rnd_m = {key: v for key, v in rnd_k.items() if key != "seed"} | {"x0": x0}
    set_loader_epoch(k.loader, 0, 0)
    batches = [b for b, _ in zip(iter(k.loader), range(2))]
    assert [k.slice_start(i) for i in range(2)] == [0, 4]
    for i, batch in enumerate(batches):
        lk = k.micro_step(batch, rnd_k, i)["loss"]
        lm = m.micro_step(batch, rnd_m, i)["loss"]
        torch.testing.assert_close(lk, lm, rtol=1e-5, atol=1e-6)
    for (name, pk), pm in zip(k.model.named_parameters(), m.model.parameters()):
        torch.testing.assert_close(pk.grad, pm.grad, rtol=1e-4, atol=1e-6, msg=lambda s, n=name: f"{n}: {s}")
    # a different seed is different noise: the losses differ
    rnd_k2 = dict(rnd_k, seed=rnd_k["seed"] + 1)
    assert not torch.equal(k.micro_step(batches[1], rnd_k2, 1)["loss"], lk)


def test_tokenizer_kernel_noise_matches_materialized_given_the_same_noise(tmp_path, kernel_device):
    """RecTok.forward(seed=, sample_offset=) through the tokenizer trainer's micro-steps: the same
    losses as explicit noise equal to the global batch's in-kernel (eps_post, eps_flow)."""
    over = {"device": kernel_device, "data": {"global_batch_size": 4, "grad_accum": 2}}
    k = TokenizerTrainer(tiny_tokenizer_cfg(str(tmp_path / "k"), noise="kernel", **over))
    m = TokenizerTrainer(tiny_tokenizer_cfg(str(tmp_path / "m"), noise="materialized", **over))
    rnd_k = k.draw_step_randomness(k.global_batch)
    c = k.raw_model.config
    e1, e2 = flow_noise(rnd_k["seed"], (k.global_batch, rnd_k["K"], c.token_channels), kernel_device)
    rnd_m = {key: v for key, v in rnd_k.items() if key != "seed"} | {"eps_post": e1, "eps_flow": e2}
    set_loader_epoch(k.loader, 0, 0)
    batches = [b for b, _ in zip(iter(k.loader), range(2))]
    assert k.slice_start(1) == 2
    for i, batch in enumerate(batches):
        lk, lm = k.micro_step(batch, rnd_k, i), m.micro_step(batch, rnd_m, i)
        # m ran last: explicit noise, on the default path for its device
        assert rectok_fast.last_backend("posterior_flow") == ("reference" if kernel_device == "cpu" else "triton")
        assert lk.keys() == lm.keys()
        for name in lk:
            torch.testing.assert_close(lk[name], lm[name], rtol=1e-4, atol=1e-6, msg=lambda s, n=name: f"{n}: {s}")
