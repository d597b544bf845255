"""``rectok-fast eval``: reconstruction metrics of a tokenizer and generation metrics of samples.

    rectok-fast eval --tokenizer runs/tok --data /data/imagenet/val --num-images 50000 --out eval/
    rectok-fast eval --samples samples/xl_ag/samples.npz --ref /data/imagenet_val_256_png --out eval/

Reconstruction: PSNR and SSIM always (per image on [0, 1], averaged), plus the mean-colour baseline;
with ``--rfid`` the originals and reconstructions are written as PNG folders and compared by
torch-fidelity / clean-fid when installed with local Inception weights.  Generation: FID, IS,
precision / recall through the same packages, or a clear message when they are unavailable.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

import numpy as np
import torch

from ..config import DataConfig, data_overrides
from ..data.datasets import build_image_dataset, embedded_scale_for
from ..errors import ArgumentError, PathError
from ..models.loading import load_tokenizer
from ..utils import write_json
from ..utils.log import setup_logging
from .metrics import generation_metrics, mean_color_psnr, psnr, ssim

logger = logging.getLogger("rectok_fast.eval")


@torch.no_grad()
def reconstruction_metrics(
    tokenizer, images_iter, device, max_images: int | None = None, keep: int = 0
) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """PSNR / SSIM / mean-colour-baseline PSNR over ``images_iter`` ((B, 3, H, W) in [-1, 1] batches).
    Returns the metrics and the first ``keep`` originals and reconstructions ([0, 1])."""
    p, s, base = [], [], []
    n = 0
    kept_x, kept_r = [], []
    for x in images_iter:
        if max_images is not None and n >= max_images:
            break
        x = x.to(device)
        r = tokenizer.reconstruct(x).float()
        x01 = (x.float() * 0.5 + 0.5).clamp(0, 1)
        p.append(psnr(r, x01).cpu())
        s.append(ssim(r, x01).cpu())
        base.append(mean_color_psnr(x01).cpu())
        if sum(len(k) for k in kept_x) < keep:
            kept_x.append(x01.cpu())
            kept_r.append(r.cpu())
        n += x.shape[0]
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


def _write_pngs(images: torch.Tensor, d: str, start: int) -> None:
    from PIL import Image

    from ..utils.images import to_uint8_hwc

    os.makedirs(d, exist_ok=True)
    for i, a in enumerate(to_uint8_hwc(images)):
        Image.fromarray(a).save(os.path.join(d, f"{start + i:06d}.png"))


def npz_to_dir(npz: str, d: str) -> str:
    arr = np.load(npz)["arr_0"]
    _write_pngs(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0, d, 0)
    return d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rectok-fast eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokenizer", default=None, help="evaluate reconstruction of this tokenizer")
    p.add_argument("--data", default="embedded", help="'embedded' (held-out crops), a folder or a file list")
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--rfid", action="store_true", help="also compute rFID (needs torch-fidelity or clean-fid + local weights)"
    )
    p.add_argument("--samples", default=None, help="generated images: a PNG folder or an ADM .npz")
    p.add_argument(
        "--ref", default=None, help="reference images for FID: a PNG folder, an .npz, or a torch-fidelity stats file"
    )
    p.add_argument("--out", default=None, help="write metrics.json here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging(None)
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
        keep = args.num_images or len(ds) if args.rfid else 0
        m, kx, kr = reconstruction_metrics(tok, (b[0] for b in loader), dev, args.num_images, keep=keep)
        res["reconstruction"] = m
        if args.rfid:
            with tempfile.TemporaryDirectory() as tmp:
                _write_pngs(kx, os.path.join(tmp, "ref"), 0)
                _write_pngs(kr, os.path.join(tmp, "rec"), 0)
                g = generation_metrics(os.path.join(tmp, "rec"), os.path.join(tmp, "ref"), isc=False, prc=False)
            res["reconstruction"]["rfid"] = g.get("fid")
            if "error" in g:
                res["reconstruction"]["rfid_error"] = g["error"]
    if args.samples:
        with tempfile.TemporaryDirectory() as tmp:
            gen = npz_to_dir(args.samples, os.path.join(tmp, "gen")) if args.samples.endswith(".npz") else args.samples
            ref = args.ref
            if ref is not None and ref.endswith(".npz"):
                ref = npz_to_dir(ref, os.path.join(tmp, "ref"))
            res["generation"] = generation_metrics(gen, ref)
    for k, v in res.items():
        logger.info("%s: %s", k, v)
    if args.out:
        write_json(os.path.join(args.out, "metrics.json"), res)
    print(res)
    return res


if __name__ == "__main__":
    main()
