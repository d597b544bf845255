"""End-to-end benchmarks (GPU only): the tokenizer training step, DiT^DH-XL training and sampling.

* ``tokenizer_train_step``: RecTok with ViT-B encoder/decoder, the tiny semantic decoder and a
  ViT-L/16-sized teacher with random weights, batch 64, 256 px, bf16 autocast; loss
  ``MSE + 1e-6·KL + cosine`` (perceptual and GAN terms are outside this comparison), AdamW,
  grad-clip 3.0.  ``fused``: rectok_fast's RecTok compiled, bf16 compiled teacher, fused AdamW;
  ``eager``: ``eager_rectok.EagerRecTok`` (the straightforward PyTorch model) with an fp32 teacher
  under autocast and the default AdamW.  Both draw the same sequence of mask ratios.  Images are a
  fixed device tensor (data loading is not timed).
* ``ditdh_xl_train_step``: DiT^DH-XL, flow-matching loss through the fused ops, compiled, bf16
  autocast, fused AdamW, grad-clip 1.0; MFU = analytic matmul FLOPs (3× forward) / time / 989 TFLOP/s.
* ``ditdh_xl_sample``: 50 Euler updates with CFG (conditional + null batch) for 256 samples,
  compiled with CUDA graphs; MFU = 50 forwards of 512 samples / time / 989 TFLOP/s.

``RECTOK_E2E_MODE=long`` runs more timed steps.  ``RECTOK_E2E_COMPILE``: ``regional`` (default:
every transformer block compiled, identical blocks sharing one graph, so compile time stays inside
the suite's budget), ``whole`` (the whole training loss, fullgraph) or ``none``; sampling always
uses ``rectok_fast.sampling.sample(compile=True)`` (CUDA graphs) unless ``none``.  Every number goes into ``benchmark.extra_info``.
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch
import torch.nn.functional as F
from common import (
    GPU_ONLY_SKIP,
    HAS_CUDA,
    PEAK_BF16_TFLOPS,
    device_name,
    ditdh_forward_flops,
    ditdh_sample_flops,
    ditdh_train_flops,
    mfu,
)

LONG = os.environ.get("RECTOK_E2E_MODE", "short") == "long"
TOK_BATCH = int(os.environ.get("RECTOK_E2E_TOK_BATCH", "64"))
DIT_BATCH = int(os.environ.get("RECTOK_E2E_DIT_BATCH", "64"))
SAMPLE_BATCH = int(os.environ.get("RECTOK_E2E_SAMPLE_BATCH", "256"))
COMPILE = os.environ.get("RECTOK_E2E_COMPILE", "regional")  # regional | whole | none
SAMPLE_STEPS = 50
CFG_SCALE = 1.5

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason=f"end-to-end benchmarks {GPU_ONLY_SKIP}")


def _fresh():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _timed(step, warmup: int, steps: int) -> tuple[float, float]:
    """Run ``warmup`` then ``steps`` calls; returns (seconds for the timed calls, peak MiB over all)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**20


def _compile_regions(module: torch.nn.Module) -> int:
    """Regional compilation: compile every element of every ModuleList (the transformer blocks).
    Identical blocks share one compiled graph, so a 30-block model compiles about as fast as one
    block; the few ops outside the blocks run eagerly."""
    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.ModuleList):
            for blk in m:
                blk.compile()
                n += 1
    return n


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16)


# ------------------------------------------------------------------------------ tokenizer


def _eager_tokenizer_step(images):
    from eager_rectok import EagerRecTok, ViTTeacher

    model = EagerRecTok().cuda().train()
    teacher = ViTTeacher().cuda().eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)

    def step():
        with torch.no_grad(), _autocast():
            feats = teacher(images)
        with _autocast():
            loss = model(images, feats)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def _fused_tokenizer_step(images, info):
    from eager_rectok import ViTTeacher

    from rectok_fast.models import RecTok
    from rectok_fast.models.rectok import Mask

    B = images.shape[0]
    model = RecTok(
        encoder="base", decoder="base", sem_decoder="tiny", teachers={"teacher": 1024}, img_size=256, token_channels=128
    )
    model = model.cuda().train()
    model.seed_masking(0)
    teacher = ViTTeacher().cuda().to(torch.bfloat16).eval().requires_grad_(False)
    info["compile"] = COMPILE
    if COMPILE == "regional":
        _compile_regions(model)
        _compile_regions(teacher)
    teacher_c = torch.compile(teacher) if COMPILE == "whole" else teacher
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, fused=True)

    def loss_fn(images, ids_keep, ids_restore, feats):
        out = model(images, Mask(ids_keep, ids_restore), teacher_features={"teacher": feats})
        rec = F.mse_loss((out.reconstruction.float() + 1) / 2, (images.float() + 1) / 2)
        return rec + 1e-6 * out.kl + out.sem_loss

    state = {"fn": torch.compile(loss_fn, fullgraph=True) if COMPILE == "whole" else loss_fn}

    def step():
        ids_keep, ids_restore = model.sample_mask(B, images.device)
        with torch.no_grad(), _autocast():
            feats = teacher_c(images)
        with _autocast():
            try:
                loss = state["fn"](images, ids_keep, ids_restore, feats)
            except Exception as e:  # report a compile failure and measure the eager fused model
                if state["fn"] is loss_fn:
                    raise
                info["fused_compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                state["fn"] = loss_fn
                loss = loss_fn(images, ids_keep, ids_restore, feats)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def test_tokenizer_train_step(benchmark):
    B = TOK_BATCH
    warmup, steps = (6, 50) if LONG else (4, 15)
    info = {
        "case": "tokenizer_train_step",
        "device": device_name(),
        "B": B,
        "img": 256,
        "steps": steps,
        "dtype": "bf16",
    }
    torch.manual_seed(0)
    images = torch.rand(B, 3, 256, 256, device="cuda") * 2 - 1

    base = _fresh()
    step, n_eager = _eager_tokenizer_step(images)
    sec, peak = _timed(step, warmup, steps)
    info.update(
        eager_img_s=B * steps / sec,
        eager_step_ms=1e3 * sec / steps,
        eager_peak_mb=peak - base / 2**20,
        eager_params=n_eager,
    )
    del step
    base = _fresh()

    def run_fused():
        s, n = _fused_tokenizer_step(images, info)
        return (*_timed(s, warmup, steps), n)

    sec, peak, n_fused = benchmark.pedantic(run_fused, rounds=1, iterations=1)
    info.update(
        fused_img_s=B * steps / sec,
        fused_step_ms=1e3 * sec / steps,
        fused_peak_mb=peak - base / 2**20,
        fused_params=n_fused,
    )
    info["speedup"] = info["fused_img_s"] / info["eager_img_s"]
    info["peak_ratio"] = info["fused_peak_mb"] / info["eager_peak_mb"]
    benchmark.extra_info.update(info)
    _fresh()
    assert n_fused == n_eager, f"fused and eager models differ in size: {n_fused} vs {n_eager} parameters"


# ------------------------------------------------------------------------------ DiT^DH-XL


def _ditdh_xl():
    from rectok_fast.models import DiTDH

    return DiTDH.from_size("XL", in_channels=128, input_size=16, num_classes=1000).cuda()


def test_ditdh_xl_train_step(benchmark):
    from rectok_fast.models.ditdh import training_loss

    B = DIT_BATCH
    warmup, steps = (5, 40) if LONG else (3, 10)
    info = {"case": "ditdh_xl_train_step", "device": device_name(), "B": B, "steps": steps, "dtype": "bf16"}
    base = _fresh()
    torch.manual_seed(0)
    model = _ditdh_xl().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    x1 = torch.randn(B, 128, 16, 16, device="cuda")
    y = torch.randint(0, 1000, (B,), device="cuda")
    seed = torch.zeros((), dtype=torch.int64, device="cuda")

    def loss_fn(x1, y, seed):
        return training_loss(model, x1, y, seed=seed)

    info["compile"] = COMPILE
    if COMPILE == "regional":
        _compile_regions(model)
    state = {"fn": torch.compile(loss_fn, fullgraph=True) if COMPILE == "whole" else loss_fn}

    def step():
        seed.add_(1)
        with _autocast():
            try:
                loss = state["fn"](x1, y, seed)
            except Exception as e:
                if state["fn"] is loss_fn:
                    raise
                info["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                state["fn"] = loss_fn
                loss = loss_fn(x1, y, seed)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec, peak = benchmark.pedantic(lambda: _timed(step, warmup, steps), rounds=1, iterations=1)
    flops = ditdh_train_flops(B)
    info.update(
        img_s=B * steps / sec,
        step_ms=1e3 * sec / steps,
        flops_per_step=flops,
        tflops=flops * steps / sec / 1e12,
        mfu=mfu(flops * steps, sec),
        peak_tflops=PEAK_BF16_TFLOPS,
        peak_mb=peak - base / 2**20,
        params=sum(p.numel() for p in model.parameters()),
    )
    benchmark.extra_info.update(info)
    assert 0 < info["mfu"] < 1, info["mfu"]


def test_ditdh_xl_sample(benchmark):
    from rectok_fast.sampling import sample

    B = SAMPLE_BATCH
    repeats = 3 if LONG else 1
    info = {
        "case": "ditdh_xl_sample",
        "device": device_name(),
        "B": B,
        "steps": SAMPLE_STEPS,
        "cfg_scale": CFG_SCALE,
        "dtype": "bf16",
    }
    base = _fresh()
    torch.manual_seed(0)
    model = _ditdh_xl().eval().requires_grad_(False)
    noise = torch.randn(B, 128, 16, 16, device="cuda")
    y = torch.randint(0, 1000, (B,), device="cuda")
    kw = {"guidance": "cfg", "scale": CFG_SCALE, "compile": COMPILE != "none"}
    try:
        with _autocast():
            sample(model, noise, y, 3, **kw)  # compile + capture the CUDA graphs
    except Exception as e:
        info["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        kw["compile"] = False

    def run():
        with _autocast():
            return sample(model, noise, y, SAMPLE_STEPS, **kw)

    out = run()  # warm-up at the measured length
    sec, peak = benchmark.pedantic(lambda: _timed(run, 0, repeats), rounds=1, iterations=1)
    flops = ditdh_sample_flops(B, SAMPLE_STEPS, cfg=True)
    info.update(
        img_s=B * repeats / sec,
        run_s=sec / repeats,
        flops_per_run=flops,
        forward_flops_per_sample=ditdh_forward_flops(1),
        tflops=flops * repeats / sec / 1e12,
        mfu=mfu(flops * repeats, sec),
        peak_tflops=PEAK_BF16_TFLOPS,
        peak_mb=peak - base / 2**20,
        compiled=bool(kw["compile"]),
    )
    benchmark.extra_info.update(info)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert 0 < info["mfu"] < 1, info["mfu"]
