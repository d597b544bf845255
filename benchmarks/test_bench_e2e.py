"""End-to-end benchmarks (GPU; toy sizes on the CPU in dry runs): tokenizer training, DiT^DH-XL
training and sampling.

* ``tokenizer_train_step``: RecTok with ViT-B encoder/decoder, the tiny semantic decoder and a
  ViT-L/16-sized teacher with random weights, batch 64, 256 px, bf16 autocast; loss
  ``MSE + 1e-6·KL + cosine`` (perceptual and GAN terms are outside this comparison), AdamW,
  grad-clip 3.0.  ``fused``: rectok_fast's RecTok compiled, bf16 compiled teacher, fused AdamW;
  ``eager``: ``eager_rectok.EagerRecTok`` (the straightforward PyTorch model) with an fp32 teacher
  under autocast and the default AdamW.  Both draw the same sequence of mask ratios.  Images are a
  fixed device tensor (data loading is not timed).
* ``ditdh_xl_train_step``: DiT^DH-XL, flow-matching loss through the fused ops, compiled, bf16
  autocast, fused AdamW, grad-clip 1.0.
* ``ditdh_xl_sample``: Euler updates with CFG (conditional + null batch) for 256 samples, compiled
  with CUDA graphs; 50 updates unless the suite's deadline leaves time for fewer (then ``steps`` <
  ``steps_planned`` and ``steps_note`` says so).

MFU = analytic matmul FLOPs (training: 3× forward) / time, against both the 989 TFLOP/s datasheet
figure (``mfu``) and the bf16 GEMM ceiling measured earlier in the same suite run (``mfu_gemm``,
from ``RECTOK_SUITE_ENV``).  ``RECTOK_E2E_DEADLINE`` (epoch seconds, set by ``gpu_suite.sh``): the
timed loops shorten to end before it, and say so.  ``RECTOK_E2E_MODE=long`` runs more timed steps.
``RECTOK_E2E_COMPILE``: ``regional`` (default: every transformer block compiled, identical blocks
sharing one graph), ``whole`` (the whole training loss, fullgraph) or ``none``.
``RECTOK_BENCH_DRY=1``: the same logic at toy sizes on the CPU (compile backend ``eager``).
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch
import torch.nn.functional as F
from common import (
    COMPILE_BACKEND,
    DRY,
    GPU_ONLY_SKIP,
    HAS_CUDA,
    device_name,
    ditdh_forward_flops,
    ditdh_sample_flops,
    ditdh_train_flops,
    mfu_both,
)

from rectok_fast._validate import trusted_indices

LONG = os.environ.get("RECTOK_E2E_MODE", "short") == "long"
COMPILE = os.environ.get("RECTOK_E2E_COMPILE", "regional")  # regional | whole | none
DEADLINE = float(os.environ.get("RECTOK_E2E_DEADLINE", "inf"))
DEV = "cuda" if HAS_CUDA else "cpu"
SCALE = "dry" if DRY else "paper"
CFG_SCALE = 1.5

# paper sizes on the GPU, toy sizes in dry runs (the same code path)
TOK = (
    {"B": 2, "img": 64, "C": 8, "enc": (64, 1, 2), "sem": (32, 1, 2), "teacher": (64, 1, 2)}
    if DRY
    else {"B": int(os.environ.get("RECTOK_E2E_TOK_BATCH", "64")), "img": 256, "C": 128, "enc": (768, 12, 12)}
    | {"sem": (192, 3, 4), "teacher": (1024, 24, 16)}
)
DIT = (
    {"size": None, "hidden": (32, 48), "depth": (1, 1), "heads": (2, 2), "C": 8, "grid": 4, "classes": 10}
    if DRY
    else {"size": "XL", "hidden": (1152, 2048), "depth": (28, 2), "C": 128, "grid": 16, "classes": 1000}
)
DIT_BATCH = 2 if DRY else int(os.environ.get("RECTOK_E2E_DIT_BATCH", "64"))
SAMPLE_BATCH = 2 if DRY else int(os.environ.get("RECTOK_E2E_SAMPLE_BATCH", "256"))
SAMPLE_STEPS = 4 if DRY else 50
# a cold compile + CUDA-graph capture of the sampler is estimated (not measured) at about this long;
# with less time left before the deadline the sampler runs eagerly and says so
SAMPLE_COMPILE_MIN_S = float(os.environ.get("RECTOK_E2E_SAMPLE_COMPILE_MIN_S", "0" if DRY else "100"))

pytestmark = pytest.mark.skipif(not (HAS_CUDA or DRY), reason=f"end-to-end benchmarks {GPU_ONLY_SKIP}")


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def _fresh() -> float:
    """Free what earlier cases left; returns the MiB still allocated (0 on the CPU)."""
    gc.collect()
    if not HAS_CUDA:
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def _peak_mb(base_mb: float) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 - base_mb if HAS_CUDA else None


def _timed(step, warmup: int, steps: int, info: dict, min_steps: int = 2) -> float:
    """Run ``warmup`` calls, then up to ``steps`` timed calls, fewer when the first timed call says
    that ``steps`` would pass :data:`DEADLINE` (never fewer than ``min_steps``).  Records
    ``steps`` / ``steps_planned`` (and ``steps_note`` when shortened); returns seconds per call."""
    for _ in range(warmup):
        step()
    _sync()
    t0 = time.perf_counter()
    step()
    _sync()
    first = time.perf_counter() - t0
    n = steps
    left = DEADLINE - time.time() - 5.0
    if first * (steps - 1) > left:
        n = max(min_steps, 1 + int(left / max(first, 1e-9)))
    n = min(n, steps)
    if n > 1:
        t0 = time.perf_counter()
        for _ in range(n - 1):
            step()
        _sync()
        per = (time.perf_counter() - t0) / (n - 1)  # the first timed call is excluded (a warm-up tail)
    else:
        per = first
    info["steps_planned"], info["steps"] = steps, n
    if n < steps:
        info["steps_note"] = f"{n} of {steps} timed steps: the suite's deadline left no time for more"
    return per


def _compile_regions(module: torch.nn.Module) -> int:
    """Regional compilation: compile every element of every ModuleList (the transformer blocks).
    Identical blocks share one compiled graph, so a 30-block model compiles about as fast as one
    block; the few ops outside the blocks run eagerly."""
    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.ModuleList):
            for blk in m:
                blk.compile(backend=COMPILE_BACKEND)
                n += 1
    return n


def _autocast():
    return torch.autocast(DEV, dtype=torch.bfloat16)


def _fused_adamw(params, **kw):
    return torch.optim.AdamW(params, fused=True, **kw) if HAS_CUDA else torch.optim.AdamW(params, **kw)


# ------------------------------------------------------------------------------ tokenizer


def _teacher():
    from eager_rectok import ViTTeacher

    w, d, h = TOK["teacher"]
    return ViTTeacher(img=TOK["img"], width=w, depth=d, heads=h)


def _eager_tokenizer_step(images):
    from eager_rectok import EagerRecTok

    w, d, h = TOK["enc"]
    model = EagerRecTok(
        img=TOK["img"], channels=TOK["C"], width=w, depth=d, heads=h, teacher_width=TOK["teacher"][0], sem=TOK["sem"]
    )
    model = model.to(DEV).train()
    teacher = _teacher().to(DEV).eval().requires_grad_(False)
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
    from rectok_fast.models import RecTok
    from rectok_fast.models.rectok import Mask

    B = images.shape[0]
    model = RecTok(
        encoder=TOK["enc"],
        decoder=TOK["enc"],
        sem_decoder=TOK["sem"],
        teachers={"teacher": TOK["teacher"][0]},
        img_size=TOK["img"],
        token_channels=TOK["C"],
    )
    model = model.to(DEV).train()
    model.seed_masking(0)
    teacher = _teacher().to(DEV).to(torch.bfloat16).eval().requires_grad_(False)
    info["compile"] = COMPILE
    if COMPILE == "regional":
        _compile_regions(model)
        _compile_regions(teacher)
    teacher_c = torch.compile(teacher, backend=COMPILE_BACKEND) if COMPILE == "whole" else teacher
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _fused_adamw(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)

    def loss_fn(images, ids_keep, ids_restore, feats):
        out = model(images, Mask(ids_keep, ids_restore), teacher_features={"teacher": feats})
        rec = F.mse_loss((out.reconstruction.float() + 1) / 2, (images.float() + 1) / 2)
        return rec + 1e-6 * out.kl + out.sem_loss

    state = {"fn": torch.compile(loss_fn, fullgraph=True, backend=COMPILE_BACKEND) if COMPILE == "whole" else loss_fn}

    def step():
        ids_keep, ids_restore = model.sample_mask(B, images.device)
        with torch.no_grad(), _autocast():
            feats = teacher_c(images)
        # the mask is an argsort permutation (valid by construction): no per-op index checks (host syncs)
        with _autocast(), trusted_indices():
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
    B = TOK["B"]
    warmup, steps = (1, 2) if DRY else ((6, 50) if LONG else (3, 10))
    info = {
        "case": "tokenizer_train_step",
        "device": device_name(),
        "scale": SCALE,
        "B": B,
        "img": TOK["img"],
        "dtype": "bf16",
        "compile_backend": COMPILE_BACKEND,
    }
    torch.manual_seed(0)
    images = torch.rand(B, 3, TOK["img"], TOK["img"], device=DEV) * 2 - 1

    base = _fresh()
    step, n_eager = _eager_tokenizer_step(images)
    eager = {}
    sec = _timed(step, warmup, steps, eager)
    info.update(
        eager_img_s=B / sec,
        eager_step_ms=1e3 * sec,
        eager_peak_mb=_peak_mb(base),
        eager_params=n_eager,
        eager_steps=eager["steps"],
    )
    del step
    base = _fresh()

    def run_fused():
        s, n = _fused_tokenizer_step(images, info)
        return _timed(s, warmup, steps, info), n

    sec, n_fused = benchmark.pedantic(run_fused, rounds=1, iterations=1)
    info.update(fused_img_s=B / sec, fused_step_ms=1e3 * sec, fused_peak_mb=_peak_mb(base), fused_params=n_fused)
    info["speedup"] = info["fused_img_s"] / info["eager_img_s"]
    if info["eager_peak_mb"]:
        info["peak_ratio"] = info["fused_peak_mb"] / info["eager_peak_mb"]
    benchmark.extra_info.update(info)
    _fresh()
    assert n_fused == n_eager, f"fused and eager models differ in size: {n_fused} vs {n_eager} parameters"


# ------------------------------------------------------------------------------ DiT^DH-XL


def _dit_flops_kw() -> dict:
    return {"tokens": DIT["grid"] ** 2, "channels": DIT["C"], "hidden": DIT["hidden"], "depth": DIT["depth"]}


def _ditdh():
    from rectok_fast.models import DiTDH

    kw = {"in_channels": DIT["C"], "input_size": DIT["grid"], "num_classes": DIT["classes"]}
    if DIT["size"]:
        return DiTDH.from_size(DIT["size"], **kw).to(DEV)
    return DiTDH(hidden_size=DIT["hidden"], depth=DIT["depth"], num_heads=DIT["heads"], **kw).to(DEV)


def test_ditdh_xl_train_step(benchmark):
    from rectok_fast.models.ditdh import training_loss

    B = DIT_BATCH
    warmup, steps = (1, 2) if DRY else ((5, 40) if LONG else (3, 10))
    info = {
        "case": "ditdh_xl_train_step",
        "device": device_name(),
        "scale": SCALE,
        "B": B,
        "dtype": "bf16",
        "compile_backend": COMPILE_BACKEND,
    }
    base = _fresh()
    torch.manual_seed(0)
    model = _ditdh().train()
    opt = _fused_adamw(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)
    x1 = torch.randn(B, DIT["C"], DIT["grid"], DIT["grid"], device=DEV)
    y = torch.randint(0, DIT["classes"], (B,), device=DEV)
    seed = torch.zeros((1,), dtype=torch.int64, device=DEV)

    def loss_fn(x1, y, seed):
        return training_loss(model, x1, y, seed=seed)

    info["compile"] = COMPILE
    if COMPILE == "regional":
        _compile_regions(model)
    state = {"fn": torch.compile(loss_fn, fullgraph=True, backend=COMPILE_BACKEND) if COMPILE == "whole" else loss_fn}

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

    sec = benchmark.pedantic(lambda: _timed(step, warmup, steps, info), rounds=1, iterations=1)
    flops = ditdh_train_flops(B, **_dit_flops_kw())
    info.update(
        img_s=B / sec,
        step_ms=1e3 * sec,
        flops_per_step=flops,
        peak_mb=_peak_mb(base),
        params=sum(p.numel() for p in model.parameters()),
        **mfu_both(flops, sec),
    )
    benchmark.extra_info.update(info)
    if not DRY:
        assert 0 < info["mfu"] < 1, info["mfu"]


def test_ditdh_xl_sample(benchmark):
    from rectok_fast.sampling import sample

    B = SAMPLE_BATCH
    info = {
        "case": "ditdh_xl_sample",
        "device": device_name(),
        "scale": SCALE,
        "B": B,
        "steps_planned": SAMPLE_STEPS,
        "cfg_scale": CFG_SCALE,
        "dtype": "bf16",
    }
    base = _fresh()
    torch.manual_seed(0)
    model = _ditdh().eval().requires_grad_(False)
    noise = torch.randn(B, DIT["C"], DIT["grid"], DIT["grid"], device=DEV)
    y = torch.randint(0, DIT["classes"], (B,), device=DEV)
    compile_arg = (
        False if COMPILE == "none" else (True if COMPILE_BACKEND == "inductor" else {"backend": COMPILE_BACKEND})
    )
    left = DEADLINE - time.time()
    if compile_arg and left < SAMPLE_COMPILE_MIN_S:
        info["compile_note"] = (
            f"sampled eagerly: {left:.0f} s were left before the suite's deadline, less than the "
            f"~{SAMPLE_COMPILE_MIN_S:.0f} s a cold compile is estimated to take"
        )
        compile_arg = False
    kw = {"guidance": "cfg", "scale": CFG_SCALE, "compile": compile_arg}
    warm = 3
    try:
        with _autocast():
            sample(model, noise, y, warm, **kw)  # compile + capture the CUDA graphs
    except Exception as e:
        info["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        kw["compile"] = False
    # one more short run times an update, so the measured run fits the deadline
    _sync()
    t0 = time.perf_counter()
    with _autocast():
        sample(model, noise, y, warm, **kw)
    _sync()
    per_update = (time.perf_counter() - t0) / warm
    steps = SAMPLE_STEPS
    left = DEADLINE - time.time() - 5.0
    if per_update * SAMPLE_STEPS > left:
        steps = max(5, int(left / per_update))
        info["steps_note"] = f"{steps} of {SAMPLE_STEPS} Euler updates: the suite's deadline left no time for more"
    info["steps"] = steps

    def run():
        with _autocast():
            return sample(model, noise, y, steps, **kw)

    holder = {}

    def timed():
        _sync()
        t0 = time.perf_counter()
        holder["out"] = run()
        _sync()
        return time.perf_counter() - t0

    sec = benchmark.pedantic(timed, rounds=1, iterations=1)
    out = holder["out"]
    flops = ditdh_sample_flops(B, steps, cfg=True, **_dit_flops_kw())
    info.update(
        img_s=B / sec,
        run_s=sec,
        flops_per_run=flops,
        forward_flops_per_sample=ditdh_forward_flops(1, **_dit_flops_kw()),
        peak_mb=_peak_mb(base),
        compiled=bool(kw["compile"]),
        **mfu_both(flops, sec),
    )
    benchmark.extra_info.update(info)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    if not DRY:
        assert 0 < info["mfu"] < 1, info["mfu"]
