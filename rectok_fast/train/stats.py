"""``rectok-fast stats``: per-channel mean/std of the posterior means over a dataset (method §3), stored
in the tokenizer (``set_latent_stats`` + ``save_pretrained``) and in ``stats.json``.

    rectok-fast stats --tokenizer runs/tok --data /data/imagenet/train [--max-images 50000]
    torchrun --nproc-per-node 8 -m rectok_fast.train.stats --tokenizer runs/tok --data /data/imagenet/train

Uses the EMA weights, no flips; sums in fp64, reduced over ranks.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist

from ..config import DataConfig
from ..data.datasets import build_image_dataset, embedded_scale_for
from ..models.loading import load_tokenizer
from ..utils import write_json
from ..utils.distributed import cleanup, init_distributed
from ..utils.log import progress_bar, setup_logging
from ..utils.threads import add_threads_arg, apply_threads
from .cli_common import data_overrides

logger = logging.getLogger("rectok_fast.train")


@torch.no_grad()
def compute_latent_stats(
    tokenizer, loader, device: torch.device, max_images: int | None = None, amp: bool = True, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and std (C,) of the posterior means of every token of every image; returns (mean, std, count).
    ``progress``: a bar over the images (with ETA)."""
    C = tokenizer.token_channels
    s = torch.zeros(C, dtype=torch.float64, device=device)
    ss = torch.zeros(C, dtype=torch.float64, device=device)
    n = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    use_amp = amp and device.type == "cuda"
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    if max_images is not None and total is not None:
        total = min(total, max_images)
    bar = progress_bar(total, "stats", enabled=progress)
    for images, _ in loader:
        if max_images is not None and seen >= max_images:
            break
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            moments = tokenizer.encode(images)
        mean = moments[..., :C].double().reshape(-1, C)
        s += mean.sum(0)
        ss += mean.pow(2).sum(0)
        n += mean.shape[0]
        seen += images.shape[0]
        bar.update(images.shape[0])
    bar.close()
    if dist.is_available() and dist.is_initialized():
        for t in (s, ss, n):
            dist.all_reduce(t)
    mu = s / n
    var = (ss / n - mu.pow(2)).clamp_min(0)
    return mu.float().cpu(), var.sqrt().float().cpu(), int(n.item())


def stats_loader(data: DataConfig, batch_size: int, rank: int, world: int, num_workers: int = 0, seed: int = 0):
    d = DataConfig(**{**data.__dict__, "hflip": False})
    ds = build_image_dataset(d, "train", seed=seed)
    idx = list(range(rank, len(ds), world))
    sub = torch.utils.data.Subset(ds, idx)
    return torch.utils.data.DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def run_stats(
    tokenizer_path: str,
    data: DataConfig,
    *,
    out: str | None = None,
    batch_size: int = 64,
    max_images: int | None = None,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    info = init_distributed(device)
    tok = load_tokenizer(tokenizer_path).to(info.device).eval()
    if data.image_size != tok.config.img_size:
        data = DataConfig(**{**data.__dict__, "image_size": tok.config.img_size})
    if data.source == "embedded":  # the crops the tokenizer was trained on (its run's data.embedded_scale)
        scale = embedded_scale_for(tokenizer_path, data.image_size, default=data.embedded_scale)
        data = DataConfig(**{**data.__dict__, "embedded_scale": scale})
    per_rank = None if max_images is None else -(-max_images // info.world_size)
    loader = stats_loader(data, batch_size, info.rank, info.world_size, num_workers)
    mu, sd, count = compute_latent_stats(tok, loader, info.device, per_rank, progress=progress and info.is_main)
    tok.set_latent_stats(mu, sd)
    res = {"latent_mean": mu.tolist(), "latent_std": sd.tolist(), "tokens": count}
    if info.is_main:
        dst = out or _export_dir(tokenizer_path)
        tok.cpu().save_pretrained(dst)
        write_json(os.path.join(dst, "stats.json"), res)
        res["saved_to"] = dst
        logger.info(
            "latent stats over %d tokens: mean |mu| %.4f, mean sigma %.4f -> %s", count, mu.abs().mean(), sd.mean(), dst
        )
    return res


def _export_dir(path: str) -> str:
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        return path
    if os.path.isdir(path):
        return os.path.join(path, "export")
    return os.path.join(os.path.dirname(os.path.abspath(path)), "export")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rectok-fast stats", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer run dir, export dir (save_pretrained) or checkpoint")
    p.add_argument("--data", default="embedded", help="'embedded', an ImageNet-style folder or a file list")
    p.add_argument(
        "--out", default=None, help="where to save the tokenizer with its stats (default: the tokenizer's export dir)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_threads_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging(None)
    apply_threads(args.threads)
    data = DataConfig(**data_overrides(args.data).get("data", {}))
    try:
        return run_stats(
            args.tokenizer,
            data,
            out=args.out,
            batch_size=args.batch_size,
            max_images=args.max_images,
            device=args.device,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
    finally:
        cleanup()


if __name__ == "__main__":  # the rectok-fast CLI's error handling (one-line user errors, 143/130 on signals)
    from rectok_fast.cli import run_as_main

    run_as_main("stats")
