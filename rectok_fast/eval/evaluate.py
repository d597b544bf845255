"""``rectok-fast eval``: reconstruction metrics of a tokenizer and generation metrics of samples.

    rectok-fast eval --tokenizer runs/tok --data /data/imagenet/val --num-images 50000 --out eval/
    rectok-fast eval --samples samples/xl_ag/samples.npz --ref /data/imagenet_val_256_png --out eval/

    rectok-fast eval --samples samples/xl_ag --ref adm_in256_stats.npz --inception-weights weights-inception-2015-12-05-6726825d.pth

Reconstruction: PSNR and SSIM always (per image on [0, 1], averaged), plus the mean-colour baseline;
with ``--rfid`` the originals and reconstructions (quantised to uint8) go through the Inception
network batch by batch (only feature means and covariances are kept).  Generation: FID and IS of
``--samples`` (an ADM ``.npz``, an image folder, or a ``rectok-fast sample`` output; one result per
scale of ``sample --scale a,b,c``) against ``--ref`` (FID statistics ``mu``/``sigma`` such as
``adm_in256_stats.npz``, or reference images).  FID/IS need torch-fidelity and its Inception weights
as a local file (``--inception-weights``, ``$RECTOK_FAST_INCEPTION_WEIGHTS`` or torch-fidelity's
cache); nothing is downloaded and a missing file is a one-line error before any work.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from ..config import DataConfig, data_overrides
from ..data.datasets import build_image_dataset, embedded_scale_for
from ..errors import ArgumentError, PathError
from ..models.loading import load_tokenizer
from ..utils import write_json
from ..utils.log import setup_logging
from ..utils.threads import add_threads_arg, apply_threads
from .metrics import (
    INCEPTION_ENV,
    FeatureStats,
    build_inception,
    frechet_distance,
    generation_metrics,
    inception_weights_path,
    load_fid_stats,
    mean_color_psnr,
    psnr,
    source_features,
    ssim,
)

logger = logging.getLogger("rectok_fast.eval")


@torch.no_grad()
def reconstruction_metrics(
    tokenizer,
    images_iter,
    device,
    max_images: int | None = None,
    keep: int = 0,
    on_batch=None,
    progress: bool = False,
    total: int | None = None,
) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """PSNR / SSIM / mean-colour-baseline PSNR over ``images_iter`` ((B, 3, H, W) in [-1, 1] batches).
    Returns the metrics and the first ``keep`` originals and reconstructions ([0, 1]).  ``on_batch(x, r)``
    sees every batch of originals and reconstructions ([0, 1]) as it is computed (how ``--rfid`` streams:
    only per-image scalars are kept here)."""
    from ..utils.log import progress_bar

    p, s, base = [], [], []
    n = 0
    kept_x, kept_r = [], []
    if max_images is not None and total is not None:
        total = min(total, max_images)
    bar = progress_bar(total, "eval (reconstruction)", enabled=progress)
    for x in images_iter:
        if max_images is not None and n >= max_images:
            break
        if max_images is not None and n + x.shape[0] > max_images:
            x = x[: max_images - n]
        x = x.to(device)
        r = tokenizer.reconstruct(x).float()
        x01 = (x.float() * 0.5 + 0.5).clamp(0, 1)
        p.append(psnr(r, x01).cpu())
        s.append(ssim(r, x01).cpu())
        base.append(mean_color_psnr(x01).cpu())
        if sum(len(k) for k in kept_x) < keep:
            kept_x.append(x01.cpu())
            kept_r.append(r.cpu())
        if on_batch is not None:
            on_batch(x01, r)
        n += x.shape[0]
        bar.update(x.shape[0])
    bar.close()
    p, s, base = torch.cat(p), torch.cat(s), torch.cat(base)
    m = {
        "psnr": float(p.mean()),
        "ssim": float(s.mean()),
        "psnr_mean_color_baseline": float(base.mean()),
        "num_images": int(len(p)),
    }
    kx = torch.cat(kept_x)[:keep] if kept_x else None
    kr = torch.cat(kept_r)[:keep] if kept_r else None
    return m, kx, kr


def _u8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] (B, 3, H, W) -> uint8 (B, 3, H, W), the quantisation a PNG round trip applies."""
    return x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def sample_outputs(samples: str) -> dict[str, str]:
    """``--samples`` -> {label: source}: one entry, or one per scale of a ``sample --scale a,b,c`` output."""
    import json

    cfg = os.path.join(samples, "sample_config.json")
    if os.path.isdir(samples) and os.path.isfile(cfg):
        with open(cfg) as f:
            scales = json.load(f).get("scales") or []
        if len(scales) > 1:
            from .sample import scale_dir

            return {f"scale-{s:g}": scale_dir(samples, s, scales) for s in scales}
    return {"samples": samples}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rectok-fast eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokenizer", default=None, help="evaluate reconstruction of this tokenizer")
    p.add_argument("--data", default="embedded", help="'embedded' (held-out crops), a folder or a file list")
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--rfid",
        action="store_true",
        help="also compute rFID (needs torch-fidelity + its local Inception weights; streamed)",
    )
    p.add_argument("--samples", default=None, help="generated images: a PNG folder or an ADM .npz")
    p.add_argument(
        "--ref",
        default=None,
        help="the FID reference: FID statistics (.npz with mu/sigma, e.g. adm_in256_stats.npz), an ADM image "
        ".npz (arr_0), a sample output or an image folder",
    )
    p.add_argument(
        "--inception-weights",
        default=None,
        help=f"local file of the FID Inception network (default: ${INCEPTION_ENV}, else torch-fidelity's cache); "
        "nothing is downloaded",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads_arg(p)
    p.add_argument("--out", default=None, help="write metrics.json here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging(None)
    apply_threads(args.threads)
    if args.tokenizer is None and args.samples is None:
        raise ArgumentError("give --tokenizer (reconstruction) and/or --samples (generation)")
    for opt, v in (("--num-images", args.num_images), ("--batch-size", args.batch_size)):
        if v is not None and v < 1:
            raise ArgumentError(f"{opt} {v}: must be a positive integer")
    for opt, v in (("--samples", args.samples), ("--ref", args.ref)):
        if v is not None and not os.path.exists(v):
            raise PathError(f"{opt} {v!r}: no such file or directory")
    dev = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    progress = not args.no_progress
    features = None
    if args.rfid or args.samples:  # before any work: a missing package or weights file is said at once
        features = build_inception(inception_weights_path(args.inception_weights), dev)
    res: dict = {}
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer).to(dev).eval()
        d = data_overrides(args.data).get("data", {})
        data = DataConfig(
            **{**d, "image_size": tok.config.img_size, "hflip": False, "embedded_len": args.num_images or 256}
        )
        if data.source == "embedded":  # the crops the tokenizer was trained on (its run's data.embedded_scale)
            data.embedded_scale = embedded_scale_for(args.tokenizer, data.image_size, default=data.embedded_scale)
        ds = build_image_dataset(data, "heldout" if data.source == "embedded" else "train")
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False)
        st_x, st_r = FeatureStats(), FeatureStats()

        def rfid_batch(x01, r):  # originals and reconstructions through Inception, batch by batch
            st_x.add(features(_u8(x01))[0])
            st_r.add(features(_u8(r))[0])

        m, _, _ = reconstruction_metrics(
            tok,
            (b[0] for b in loader),
            dev,
            args.num_images,
            on_batch=rfid_batch if args.rfid else None,
            progress=progress,
            total=len(ds),
        )
        if args.rfid:
            m["rfid"] = frechet_distance(*st_r.mu_sigma(), *st_x.mu_sigma())
        res["reconstruction"] = m
    if args.samples:
        ref_stats = None
        if args.ref is not None:
            ref_stats = load_fid_stats(args.ref)
            if ref_stats is None:  # reference images: their statistics once, for every scale
                ref_stats = source_features(
                    args.ref, features, args.batch_size, progress, desc="inception (reference)"
                )[0].mu_sigma()
        gen = {}
        for label, src in sample_outputs(args.samples).items():
            gen[label] = generation_metrics(
                src, ref_stats=ref_stats, features=features, batch_size=args.batch_size, progress=progress
            )
        res["generation"] = gen["samples"] if list(gen) == ["samples"] else gen
    for k, v in res.items():
        logger.info("%s: %s", k, v)
    if args.out:
        write_json(os.path.join(args.out, "metrics.json"), res)
    print(res)
    return res


if __name__ == "__main__":  # the rectok-fast CLI's error handling (one-line user errors, 143/130 on signals)
    from rectok_fast.cli import run_as_main

    run_as_main("eval")
