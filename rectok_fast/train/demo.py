"""``rectok-fast demo --out DIR``: the whole pipeline, end to end, with no download.

1. trains the tiny tokenizer on crops of scikit-image's bundled sample images with the tiny teacher:
   stage 1 (``configs/tokenizer/tiny.yaml``: masking, flow noise, semantic distillation) then stage 2
   (``configs/tokenizer/tiny_stage2.yaml``: pixel decoder only, clean latents);
2. computes its latent statistics and caches the latents of the training crops;
3. trains a tiny DiT^DH (``configs/dit/tiny.yaml``) on them, one class per source image;
4. samples every class and reconstructs held-out crops (rows of pixels never seen in training).

Writes ``DIR/reconstructions.png`` (rows captioned: held-out originals, reconstructions; columns by
source image), ``DIR/samples.png`` (one captioned column per class), ``DIR/metrics.json`` (``psnr``, ``ssim``,
``psnr_mean_color_baseline``, ``tokenizer_steps``, ``dit_steps``, ``seconds``, ...), and the run
directories ``DIR/tokenizer``, ``DIR/latents``, ``DIR/dit``.  A few minutes on a 2-core CPU;
``--device cuda`` trains larger models for longer in about the same time.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from ..config import DataConfig, load_config, resolve_config_path
from ..models.loading import load_dit, load_tokenizer
from ..utils import write_json
from ..utils.images import save_grid
from ..utils.log import setup_logging
from ..utils.threads import THREADS_HELP, pick_threads  # noqa: F401  (pick_threads: re-exported)

logger = logging.getLogger("rectok_fast.demo")

# (tokenizer steps, DiT steps, held-out crops, overrides) per device
PRESETS = {
    "cpu": dict(tokenizer_steps=1000, stage2_steps=600, dit_steps=1500, heldout=128, tok={}, dit={}),
    "cuda": dict(
        tokenizer_steps=3000,
        stage2_steps=1500,
        dit_steps=4000,
        heldout=512,
        tok={
            "data": {"image_size": 128, "embedded_scale": 0.5, "global_batch_size": 64, "num_workers": 4},
            "model": {"name": "small", "latent_channels": 32, "extra": {"patch_size": 16}},
        },
        dit={
            "data": {"global_batch_size": 128},
            "model": {"extra": {"hidden_size": [384, 512], "depth": [6, 1], "num_heads": [6, 8]}},
        },
    ),
}


def run_demo(
    out: str,
    device: str = "auto",
    tokenizer_steps: int | None = None,
    dit_steps: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    sample_steps: int = 25,
    stage2_steps: int | None = None,
) -> dict:
    from ..eval.evaluate import reconstruction_metrics
    from ..eval.sample import generate
    from .cache_latents import cache_latents
    from .dit import train_dit
    from .stats import run_stats
    from .tokenizer import train_tokenizer

    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    setup_logging(out)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    preset = PRESETS["cuda" if dev == "cuda" else "cpu"]
    if dev == "cpu":
        torch.set_num_threads(pick_threads(threads))
    tok_steps = tokenizer_steps or preset["tokenizer_steps"]
    s2_steps = preset["stage2_steps"] if stage2_steps is None else stage2_steps
    dit_steps = dit_steps or preset["dit_steps"]
    logger.info(
        "demo on %s (%d threads): %d + %d tokenizer steps, %d DiT steps",
        dev,
        torch.get_num_threads(),
        tok_steps,
        s2_steps,
        dit_steps,
    )

    # 1. tokenizer
    tok_dir = os.path.join(out, "tokenizer")
    over = {
        "out": tok_dir,
        "overwrite": True,  # each demo starts afresh in its own subdirectories
        "device": dev,
        "seed": seed,
        "optim": {"total_steps": tok_steps},
        "log": {"progress": progress, "image_every": 0, "ckpt_every": tok_steps},
    }
    from ..config import merge

    tok_cfg = load_config(resolve_config_path("tokenizer/tiny"), merge(preset["tok"], over))
    tok_metrics = train_tokenizer(tok_cfg)
    export = tok_metrics["export"]
    s2_metrics = {"step": 0}
    if s2_steps > 0:  # stage 2: the pixel decoder alone on clean latents
        over = {
            **over,
            "out": os.path.join(out, "tokenizer_stage2"),
            "optim": {"total_steps": s2_steps},
            "model": {"init": export},
        }
        over["log"] = {**over["log"], "ckpt_every": s2_steps}
        s2_cfg = load_config(resolve_config_path("tokenizer/tiny_stage2"), merge(preset["tok"], over))
        s2_metrics = train_tokenizer(s2_cfg)
        export = s2_metrics["export"]

    # 2. latent statistics + cache
    data = DataConfig(
        source="embedded",
        image_size=tok_cfg.data.image_size,
        embedded_len=1024,
        embedded_scale=tok_cfg.data.embedded_scale,
    )
    run_stats(export, data, device=dev, max_images=512, progress=progress)
    lat_dir = os.path.join(out, "latents")
    cache_latents(
        export,
        DataConfig(**{**data.__dict__, "embedded_len": 4096}),
        lat_dir,
        device=dev,
        seed=seed,
        progress=progress,
    )

    # 3. DiT
    dit_dir = os.path.join(out, "dit")
    from ..data.datasets import EMBEDDED_NAMES

    n_cls = len(EMBEDDED_NAMES)
    over = {
        "out": dit_dir,
        "overwrite": True,
        "device": dev,
        "seed": seed,
        "data": {"latents": lat_dir},
        "model": {"tokenizer": export, "num_classes": n_cls, "latent_channels": tok_cfg.model.latent_channels},
        "optim": {"total_steps": dit_steps},
        "log": {"progress": progress, "ckpt_every": dit_steps},
    }
    dit_cfg = load_config(resolve_config_path("dit/tiny"), merge(preset["dit"], over))
    dit_metrics = train_dit(dit_cfg)

    # 4. samples and held-out reconstructions
    tdev = torch.device(dev)
    tok = load_tokenizer(export).to(tdev).eval()
    dit = load_dit(dit_metrics["export"]).to(tdev).eval()
    per_class = 4
    idx = list(range(n_cls * per_class))
    y = torch.tensor([i % n_cls for i in idx])
    samples = generate(dit, tok, idx, y, steps=sample_steps, guidance="cfg", scale=2.0, seed=seed)
    names = list(EMBEDDED_NAMES)
    save_grid(samples, os.path.join(out, "samples.png"), nrow=n_cls, min_side=96, col_labels=names)

    from ..data.datasets import EmbeddedImages

    held = EmbeddedImages(
        tok.config.img_size, split="heldout", length=preset["heldout"], scale=tok_cfg.data.embedded_scale, seed=seed + 1
    )
    loader = torch.utils.data.DataLoader(held, batch_size=32, shuffle=False)
    rec, kx, kr = reconstruction_metrics(tok, (b[0] for b in loader), tdev, keep=n_cls)
    save_grid(
        torch.cat([kx, kr]),
        os.path.join(out, "reconstructions.png"),
        nrow=n_cls,
        min_side=96,
        row_labels=["held-out originals", "reconstructions"],
        col_labels=[names[held[i][1]] for i in range(len(kx))],
    )

    final_tok = s2_metrics if s2_steps > 0 else tok_metrics
    metrics = {
        **{k: rec[k] for k in ("psnr", "ssim", "psnr_mean_color_baseline")},
        "heldout_images": rec["num_images"],
        "tokenizer_steps": tok_metrics["step"] + s2_metrics["step"],
        "tokenizer_stage1_steps": tok_metrics["step"],
        "tokenizer_stage2_steps": s2_metrics["step"],
        "dit_steps": dit_metrics["step"],
        # the last logged losses of the model the images come from (stage 2 when it ran)
        "tokenizer_final": {k: v for k, v in final_tok.items() if isinstance(v, float)},
        "tokenizer_final_stage": 2 if s2_steps > 0 else 1,
        "tokenizer_stage1_final": {k: v for k, v in tok_metrics.items() if isinstance(v, float)},
        "dit_final_loss": dit_metrics.get("loss"),
        "device": dev,
        "threads": torch.get_num_threads() if dev == "cpu" else None,
        "seconds": time.perf_counter() - t0,
    }
    write_json(os.path.join(out, "metrics.json"), metrics)
    logger.info(
        "demo done in %.0f s: held-out PSNR %.2f dB (mean-colour baseline %.2f dB), SSIM %.3f -> %s",
        metrics["seconds"],
        metrics["psnr"],
        metrics["psnr_mean_color_baseline"],
        metrics["ssim"],
        out,
    )
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rectok-fast demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--tokenizer-steps", type=int, default=None, help="stage-1 steps (default: 1000 on CPU, 3000 on GPU)"
    )
    p.add_argument(
        "--stage2-steps",
        type=int,
        default=None,
        help="stage-2 (decoder) steps (default: 600 on CPU, 1500 on GPU; 0 skips)",
    )
    p.add_argument("--dit-steps", type=int, default=None, help="default: 1500 on CPU, 4000 on GPU")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    a = build_parser().parse_args(argv)
    return run_demo(
        a.out,
        a.device,
        a.tokenizer_steps,
        a.dit_steps,
        a.seed,
        a.threads,
        not a.no_progress,
        a.sample_steps,
        stage2_steps=a.stage2_steps,
    )


if __name__ == "__main__":  # the rectok-fast CLI's error handling (one-line user errors, 143/130 on signals)
    from rectok_fast.cli import run_as_main

    run_as_main("demo")
