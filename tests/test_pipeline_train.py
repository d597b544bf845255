"""Training pipelines on tiny models (CPU): losses go down, resume is bit-exact, two-process gloo DDP
equals one process on the same global batch, stage 2 trains the pixel decoder only."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from pipeline_helpers import state_of, synthetic_latent_cache, tiny_dit_cfg, tiny_tokenizer_cfg

from rectok_fast.config import to_dict
from rectok_fast.train.dit import DiTTrainer
from rectok_fast.train.tokenizer import TokenizerTrainer, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_states_equal(a: dict, b: dict, keys=("model", "model_ema"), exact=True, atol=0.0):
    for k in keys:
        assert a[k].keys() == b[k].keys()
        for name in a[k]:
            x, y = a[k][name], b[k][name]
            if exact:
                assert torch.equal(x, y), f"{k}.{name} differs (max {(x.float() - y.float()).abs().max():.3e})"
            else:
                torch.testing.assert_close(x, y, atol=atol, rtol=1e-5, msg=lambda m, k=k, n=name: f"{k}.{n}: {m}")


# ----------------------------------------------------------------------------- tokenizer


@torch.no_grad()
def _recon_mse(model, images):
    model.eval()
    r = model.decode(model.posterior_mean(model.encode(images)))
    return (r - images).pow(2).mean().item()


def test_tokenizer_steps_lower_the_loss(tmp_path):
    cfg = tiny_tokenizer_cfg(
        str(tmp_path), optim={"blr": 0.128, "total_steps": 40}, loss={"gan": 0.0}, data={"embedded_len": 8}
    )
    tr = TokenizerTrainer(cfg)
    images = torch.stack([tr.dataset[i][0] for i in range(8)])
    before = _recon_mse(tr.raw_model, images)
    tr.raw_model.train()
    m = tr.fit()
    after = _recon_mse(tr.raw_model, images)
    assert after < 0.75 * before, (before, after)
    assert {"l2", "kl", "sem", "loss"} <= set(m) and m["step"] == 40
    lines = open(os.path.join(cfg.out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 20  # log_every = 2


def test_tokenizer_resume_is_bit_exact(tmp_path):
    # GAN on from the start: the discriminator, its optimizer and BatchNorm buffers must resume too
    full = tiny_tokenizer_cfg(str(tmp_path / "full"), max_steps=8, data={"grad_accum": 2})
    train_tokenizer(full)
    half = tiny_tokenizer_cfg(str(tmp_path / "half"), max_steps=4, data={"grad_accum": 2})
    train_tokenizer(half)
    resumed = tiny_tokenizer_cfg(str(tmp_path / "half"), max_steps=8, resume=True, data={"grad_accum": 2})
    train_tokenizer(resumed)
    a = state_of(os.path.join(full.out, "checkpoints", "latest.pt"))
    b = state_of(os.path.join(half.out, "checkpoints", "latest.pt"))
    assert a["step"] == b["step"] == 8
    _assert_states_equal(a, b, keys=("model", "model_ema", "disc"))
    for k in ("model", "disc"):
        sa, sb = a["optimizers"][k]["state"], b["optimizers"][k]["state"]
        assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    for key in ("model", "model_ema", "optimizer", "step", "rng"):
        assert key in a
    # the half run kept step 4 and step 8 (keep_last=2) and latest.pt
    assert sorted(os.listdir(os.path.join(half.out, "checkpoints"))) == [
        "latest.pt",
        "step_00000004.pt",
        "step_00000008.pt",
    ]


def test_tokenizer_stage2_trains_decoder_only(tmp_path):
    s1 = tiny_tokenizer_cfg(str(tmp_path / "s1"), max_steps=2)
    train_tokenizer(s1)
    s2 = tiny_tokenizer_cfg(
        str(tmp_path / "s2"),
        stage=2,
        max_steps=3,
        model={"init": s1.out, "extra": {"mask_ratio": 0.0, "mask_ratio_min": 0.0, "gamma": 0.0}},
        loss={"kl": 0.0, "semantic": 0.0},
    )
    tr = TokenizerTrainer(s2)
    assert tr.gan_start_step == 0 and not tr.use_sem
    init = {k: v.clone() for k, v in tr.raw_model.state_dict().items()}
    tr.fit()
    after = tr.raw_model.state_dict()
    assert all(torch.equal(init[k], after[k]) for k in init if k.startswith(("encoder.", "sem_decoders.")))
    assert any(not torch.equal(init[k], after[k]) for k in init if k.startswith("decoder."))
    tr.export()
    assert os.path.exists(os.path.join(s2.out, "export", "model.safetensors"))


# ----------------------------------------------------------------------------- DiT


def test_dit_steps_lower_the_loss_and_resume_exact(tmp_path):
    lat = synthetic_latent_cache(str(tmp_path / "lat"))
    cfg = tiny_dit_cfg(str(tmp_path / "a"), lat, optim={"lr": 3e-3, "total_steps": 120}, log={"log_every": 20})
    m_first = None
    tr = DiTTrainer(cfg)
    out = tr.fit()
    lines = [__import__("json").loads(x) for x in open(os.path.join(cfg.out, "metrics.jsonl"))]
    m_first, m_last = lines[0]["loss"], lines[-1]["loss"]
    assert m_last < 0.8 * m_first, (m_first, m_last)
    assert out["step"] == 120
    # bit-exact resume: 8 steps == 4 steps + resume to 8
    full = tiny_dit_cfg(str(tmp_path / "full"), lat, max_steps=8)
    DiTTrainer(full).fit()
    half = tiny_dit_cfg(str(tmp_path / "half"), lat, max_steps=4)
    DiTTrainer(half).fit()
    DiTTrainer(tiny_dit_cfg(str(tmp_path / "half"), lat, max_steps=8, resume=True)).fit()
    _assert_states_equal(
        state_of(os.path.join(full.out, "checkpoints", "latest.pt")),
        state_of(os.path.join(half.out, "checkpoints", "latest.pt")),
    )


def test_dit_export_loads_and_samples(tmp_path):
    from rectok_fast.sampling import sample
    from rectok_fast.train.builders import load_dit

    lat = synthetic_latent_cache(str(tmp_path / "lat"))
    cfg = tiny_dit_cfg(str(tmp_path / "run"), lat, max_steps=2)
    tr = DiTTrainer(cfg)
    tr.fit()
    for src in (tr.export(), cfg.out, os.path.join(cfg.out, "checkpoints", "latest.pt")):
        dit = load_dit(src)
        for k, v in tr.ema.module.state_dict().items():
            assert torch.equal(dit.state_dict()[k], v), (src, k)
    x = sample(dit, torch.randn(2, 8, 2, 2), torch.tensor([0, 3]), 3, guidance="cfg", scale=1.5)
    assert x.shape == (2, 8, 2, 2) and torch.isfinite(x).all()


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, kind: str, cfg_dict: dict):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from rectok_fast.config import RunConfig, from_dict
    from rectok_fast.utils.distributed import cleanup

    cfg = from_dict(RunConfig, cfg_dict)
    try:
        (TokenizerTrainer if kind == "tokenizer" else DiTTrainer)(cfg).fit()
    finally:
        cleanup()


def _run_ddp(kind: str, cfg) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), kind, to_dict(cfg)), nprocs=2, join=True)


def test_ddp_two_process_gloo_equals_single_process_dit(tmp_path):
    lat = synthetic_latent_cache(str(tmp_path / "lat"))
    single = tiny_dit_cfg(str(tmp_path / "single"), lat, max_steps=4)
    DiTTrainer(single).fit()
    ddp = tiny_dit_cfg(str(tmp_path / "ddp"), lat, max_steps=4)
    _run_ddp("dit", ddp)
    a = state_of(os.path.join(single.out, "checkpoints", "latest.pt"))
    b = state_of(os.path.join(ddp.out, "checkpoints", "latest.pt"))
    assert b["world_size"] == 2 and a["step"] == b["step"] == 4
    _assert_states_equal(a, b, exact=False, atol=2e-6)  # only the all-reduce summation order differs


def test_ddp_two_process_gloo_equals_single_process_tokenizer(tmp_path):
    over = dict(max_steps=3, loss={"gan": 0.0})  # (BatchNorm statistics in the discriminator are per rank)
    single = tiny_tokenizer_cfg(str(tmp_path / "single"), **over)
    train_tokenizer(single)
    ddp = tiny_tokenizer_cfg(str(tmp_path / "ddp"), **over)
    _run_ddp("tokenizer", ddp)
    a = state_of(os.path.join(single.out, "checkpoints", "latest.pt"))
    b = state_of(os.path.join(ddp.out, "checkpoints", "latest.pt"))
    _assert_states_equal(a, b, exact=False, atol=2e-6)


def test_fsdp2_two_process_equals_single_process_dit(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) needs torch.distributed")
    lat = synthetic_latent_cache(str(tmp_path / "lat"))
    single = tiny_dit_cfg(str(tmp_path / "single"), lat, max_steps=4)
    DiTTrainer(single).fit()
    fsdp = tiny_dit_cfg(str(tmp_path / "fsdp"), lat, max_steps=4, distributed="fsdp")
    _run_ddp("dit", fsdp)
    a = state_of(os.path.join(single.out, "checkpoints", "latest.pt"))
    b = state_of(os.path.join(fsdp.out, "checkpoints", "latest.pt"))
    assert b["world_size"] == 2
    _assert_states_equal(a, b, exact=False, atol=2e-6)  # full (unsharded) state dicts in the checkpoint
