"""``rectok-fast cache-latents``: encode a dataset once into sharded posterior moments.

    rectok-fast cache-latents --tokenizer runs/tok --data /data/imagenet/train --out /data/latents [--flip]
    torchrun --nproc-per-node 8 -m rectok_fast.train.cache_latents --tokenizer runs/tok --data ... --out ...

Writes ``OUT/shard_r<rank>_<k>.safetensors`` (``moments`` (n, N, 2C), ``labels`` (n,)) and
``OUT/index.json`` with the tokenizer's latent statistics (run ``stats`` first).  ``--flip`` also
stores the horizontally flipped image of every sample (the DiT then sees both).
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.distributed as dist

from ..config import DataConfig
from ..data.datasets import build_image_dataset, embedded_scale_for
from ..data.latents import ShardWriter, write_latent_cache
from ..models.loading import load_tokenizer
from ..utils.distributed import barrier, cleanup, init_distributed
from ..utils.log import progress_bar, setup_logging
from ..utils.threads import add_threads_arg, apply_threads
from .cli_common import data_overrides

logger = logging.getLogger("rectok_fast.train")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def cache_latents(
    tokenizer_path: str,
    data: DataConfig,
    out: str,
    *,
    batch_size: int = 64,
    flip: bool = False,
    dtype: str = "fp32",
    shard_size: int = 8192,
    max_images: int | None = None,
    device: str = "auto",
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    info = init_distributed(device)
    tok = load_tokenizer(tokenizer_path).to(info.device).eval()
    if float(tok.latent_std.min()) == 1.0 and float(tok.latent_mean.abs().max()) == 0.0:
        logger.warning("the tokenizer has default latent stats (mean 0, std 1): run `rectok-fast stats` first")
    data = DataConfig(**{**data.__dict__, "image_size": tok.config.img_size})
    if data.source == "embedded":  # the crops the tokenizer was trained on (its run's data.embedded_scale)
        data.embedded_scale = embedded_scale_for(tokenizer_path, data.image_size, default=data.embedded_scale)
    ds = build_image_dataset(data, "train", seed=seed)
    n_total = len(ds) if max_images is None else min(len(ds), max_images)
    idx = list(range(info.rank, n_total, info.world_size))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, idx),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=info.device.type == "cuda",
    )
    writer = ShardWriter(out, shard_size, info.rank)
    use_amp = info.device.type == "cuda"
    bar = progress_bar(len(idx), "cache-latents", enabled=progress and info.is_main)
    for images, labels in loader:
        images = images.to(info.device, non_blocking=True)
        views = [images, images.flip(-1)] if flip else [images]
        for v in views:
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=use_amp):
                moments = tok.encode(v)
            writer.add(moments.float().to(DTYPES[dtype]), labels)
        bar.update(images.shape[0])
    bar.close()
    writer.flush()
    shards = writer.shards
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, shards)
        shards = [s for part in gathered for s in part]
    meta = {
        "num_classes": int(getattr(ds, "num_classes", 0) or 0),
        "tokenizer": str(tokenizer_path),
        "flip": flip,
        "dtype": dtype,
        "image_size": tok.config.img_size,
        "scale_factor": float(tok.config.scale_factor),
    }
    res = {"out": out, "num": sum(s["count"] for s in shards), "shards": len(shards)}
    if info.is_main:
        write_latent_cache(
            out,
            shards,
            grid=tok.grid,
            channels=tok.token_channels,
            mean=tok.latent_mean.cpu(),
            std=tok.latent_std.cpu(),
            meta=meta,
        )
        logger.info("cached %d latents in %d shards under %s", res["num"], res["shards"], out)
    barrier()
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rectok-fast cache-latents", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer export dir / run dir / checkpoint (with latent stats)")
    p.add_argument("--data", default="embedded", help="'embedded', an ImageNet-style folder or a file list")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--flip", action="store_true", help="also cache the horizontally flipped images")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=8192)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--image-count", type=int, default=None, help="virtual length of the embedded dataset")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_threads_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging(None)
    apply_threads(args.threads)
    d = data_overrides(args.data).get("data", {})
    if args.image_count:
        d["embedded_len"] = args.image_count
    try:
        return cache_latents(
            args.tokenizer,
            DataConfig(**d),
            args.out,
            batch_size=args.batch_size,
            flip=args.flip,
            dtype=args.dtype,
            shard_size=args.shard_size,
            max_images=args.max_images,
            device=args.device,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
    finally:
        cleanup()


if __name__ == "__main__":  # the rectok-fast CLI's error handling (one-line user errors, 143/130 on signals)
    from rectok_fast.cli import run_as_main

    run_as_main("cache-latents")
