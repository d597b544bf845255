"""``rectok-fast sample``: class-conditional samples from a DiT^DH, decoded by the tokenizer.

    rectok-fast sample --dit runs/dit --tokenizer runs/tok --out samples/ --num-images 64 --steps 50
    # the released models by name (fetched into the Hugging Face cache; latent statistics from `rectok-fast stats`):
    rectok-fast sample --pretrained ditdh-xl-600e --tokenizer rectok-decft --latent-stats tok_stats/ \
        --guide ditdh-s-30e --scale 1.29 --steps 149 --out samples/
    # the 50k-image FID protocol on 8 GPUs (each rank takes every 8th index; results do not depend on
    # the number of ranks because sample i always uses noise seeded by (seed, i)):
    torchrun --nproc-per-node 8 -m rectok_fast.eval.sample --dit runs/ditdh_xl --tokenizer runs/tok \\
        --num-images 50000 --steps 149 --guidance autoguidance --scale 1.29 --guide-model runs/ditdh_s \\
        --out samples/xl_ag --npz --no-grid

Writes ``OUT/grid.png`` (unless ``--no-grid``), ``OUT/images/<index>.png`` with ``--png``, and the
ADM-style ``OUT/samples.npz`` (``arr_0``: (N, H, W, 3) uint8, ``arr_1``: labels) with ``--npz``.
Labels: ``i % num_classes`` (balanced), or ``--classes 1,7,207``.
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import torch

from ..errors import ArgumentError, DataError, PathError
from ..hub import resolve_pretrained
from ..models.loading import load_dit, load_tokenizer
from ..utils import write_json
from ..utils.distributed import barrier, cleanup, init_distributed
from ..utils.images import save_grid, to_uint8_hwc
from ..utils.log import setup_logging

logger = logging.getLogger("rectok_fast.eval")


def sample_noise(indices: list[int], shape: tuple[int, ...], seed: int, device) -> torch.Tensor:
    """Per-sample noise seeded by ``(seed, index)``: independent of the batch and rank layout."""
    out = torch.empty(len(indices), *shape)
    for j, i in enumerate(indices):
        out[j] = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
    return out.to(device)


@torch.no_grad()
def decode_latents(tokenizer, lat: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, C, g, g) -> images (B, 3, H, W) in [0, 1]."""
    return tokenizer.detokenize(lat.float())


@torch.no_grad()
def generate(
    dit,
    tokenizer,
    indices: list[int],
    labels: torch.Tensor,
    *,
    steps: int,
    method: str = "euler",
    guidance: str | None = None,
    scale: float = 1.0,
    guide_model=None,
    interval=(0.0, 1.0),
    shift: float | None = None,
    seed: int = 0,
    amp: bool = True,
) -> torch.Tensor:
    from ..sampling import sample

    dev = next(dit.parameters()).device
    C, g = dit.config.in_channels, dit.config.input_size
    noise = sample_noise(indices, (C, g, g), seed, dev)
    gen = torch.Generator(device=dev).manual_seed(seed + 7 + (indices[0] if indices else 0))
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp and dev.type == "cuda"):
        lat = sample(
            dit,
            noise,
            labels.to(dev),
            steps,
            method=method,
            shift=shift,
            guidance=guidance,
            scale=scale,
            guide_model=guide_model,
            interval=tuple(interval),
            generator=gen,
        )
    return decode_latents(tokenizer, lat)


def run_sample(args: argparse.Namespace) -> dict:
    info = init_distributed(args.device)
    dev = info.device
    dit = load_dit(resolve_pretrained(args.dit, "dit")).to(dev).eval()
    tok = load_tokenizer(resolve_pretrained(args.tokenizer, "tokenizer")).to(dev).eval()
    if args.latent_stats:
        tok.set_latent_stats(*read_latent_stats(args.latent_stats))
    guide = load_dit(resolve_pretrained(args.guide_model, "dit")).to(dev).eval() if args.guide_model else None
    guidance = args.guidance or ("autoguidance" if guide is not None else "none")
    guidance = None if guidance == "none" else guidance
    classes = parse_classes(args.classes, dit.num_classes) if args.classes else list(range(dit.num_classes))
    all_idx = list(range(args.num_images))
    mine = all_idx[info.rank :: info.world_size]
    os.makedirs(args.out, exist_ok=True)
    imgs_out, labels_out, idx_out = [], [], []
    for b in range(0, len(mine), args.batch_size):
        idx = mine[b : b + args.batch_size]
        y = torch.tensor([classes[i % len(classes)] for i in idx], dtype=torch.long)
        imgs = generate(
            dit,
            tok,
            idx,
            y,
            steps=args.steps,
            method=args.method,
            guidance=guidance,
            scale=args.scale,
            guide_model=guide,
            interval=args.interval,
            shift=args.shift,
            seed=args.seed,
        )
        if args.png:
            from PIL import Image

            os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
            for i, a in zip(idx, to_uint8_hwc(imgs)):
                Image.fromarray(a).save(os.path.join(args.out, "images", f"{i:06d}.png"))
        imgs_out.append(imgs.cpu())
        labels_out.append(y)
        idx_out += idx
    imgs = torch.cat(imgs_out) if imgs_out else torch.empty(0)
    labels = torch.cat(labels_out) if labels_out else torch.empty(0, dtype=torch.long)
    if args.npz:
        np.savez(
            os.path.join(args.out, f"part_r{info.rank:03d}.npz"),
            arr_0=to_uint8_hwc(imgs),
            arr_1=labels.numpy(),
            idx=np.array(idx_out),
        )
    barrier()
    res = {"num_images": args.num_images, "out": args.out}
    if info.is_main:
        if args.npz:
            parts = [np.load(os.path.join(args.out, f"part_r{r:03d}.npz")) for r in range(info.world_size)]
            order = np.argsort(np.concatenate([p["idx"] for p in parts]))
            arr = np.concatenate([p["arr_0"] for p in parts])[order]
            lab = np.concatenate([p["arr_1"] for p in parts])[order]
            np.savez(os.path.join(args.out, "samples.npz"), arr_0=arr, arr_1=lab)
            for r in range(info.world_size):
                os.remove(os.path.join(args.out, f"part_r{r:03d}.npz"))
            res["npz"] = os.path.join(args.out, "samples.npz")
        if not args.no_grid and len(imgs):
            n = min(len(imgs), args.grid_size)
            res["grid"] = save_grid(imgs[:n], os.path.join(args.out, "grid.png"))
        write_json(os.path.join(args.out, "sample_config.json"), {k: v for k, v in vars(args).items()})
    return res


def check_args(args: argparse.Namespace) -> None:
    """Range checks of the numeric options (:class:`~rectok_fast.errors.ArgumentError` naming the option)."""
    for opt, v in (("--num-images", args.num_images), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        if v < 1:
            raise ArgumentError(f"{opt} {v}: must be a positive integer")
    if args.grid_size < 0:
        raise ArgumentError(f"--grid-size {args.grid_size}: must be >= 0")
    lo, hi = args.interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ArgumentError(f"--interval {lo} {hi}: need 0 <= LO <= HI <= 1")


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """``--classes 1,7,207`` -> ``[1, 7, 207]``, each in ``[0, num_classes)`` (the model's classes; index
    ``num_classes`` is the CFG null class and no class to sample)."""
    out = []
    for c in spec.split(","):
        c = c.strip()
        try:
            k = int(c)
        except ValueError:
            raise ArgumentError(f"--classes {spec!r}: {c!r} is not an integer class id") from None
        if not 0 <= k < num_classes:
            raise ArgumentError(
                f"--classes {spec!r}: class {k} is out of range; the model has {num_classes} classes (0..{num_classes - 1})"
            )
        out.append(k)
    if not out:
        raise ArgumentError(f"--classes {spec!r}: no class ids")
    return out


def read_latent_stats(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``latent_mean`` / ``latent_std`` from the ``stats.json`` of ``rectok-fast stats`` (or its directory)."""
    import json

    if os.path.isdir(path):
        path = os.path.join(path, "stats.json")
    if not os.path.isfile(path):
        raise PathError(f"sample --latent-stats: no stats file at {path!r} (run `rectok-fast stats` first)")
    with open(path) as f:
        d = json.load(f)
    if "latent_mean" not in d or "latent_std" not in d:
        raise DataError(f"sample --latent-stats: {path!r} has no latent_mean / latent_std")
    return torch.tensor(d["latent_mean"], dtype=torch.float32), torch.tensor(d["latent_std"], dtype=torch.float32)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rectok-fast sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dit",
        "--pretrained",
        dest="dit",
        required=True,
        help="the DiT^DH: a released name (ditdh-xl-600e, ditdh-xl-80e, ditdh-s-30e), a hub repo id "
        "(ORG/NAME[/file][@rev]), a run dir, an export dir or a checkpoint (rectok-fast download --list)",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        help="the tokenizer: a released name (rectok, rectok-decft), a hub repo id, a run dir, an export dir "
        "(with latent stats) or a checkpoint",
    )
    p.add_argument(
        "--latent-stats",
        default=None,
        help="stats.json written by `rectok-fast stats` (or its directory): the tokenizer's latent mean/std "
        "(the released tokenizers ship none)",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--classes", default=None, help="comma-separated class ids (default: all, balanced)")
    p.add_argument("--steps", type=int, default=50, help="solver updates (the paper's 150-point grid is 149)")
    p.add_argument("--method", default="euler", choices=["euler", "heun", "euler_maruyama", "sde"])
    p.add_argument(
        "--guidance",
        default=None,
        choices=["none", "cfg", "autoguidance"],
        help="default: autoguidance when --guide is given, else none",
    )
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument(
        "--guide-model",
        "--guide",
        dest="guide_model",
        default=None,
        help="the weaker DiT for autoguidance, in the forms of --dit (released: ditdh-s-30e)",
    )
    p.add_argument("--interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"))
    p.add_argument("--shift", type=float, default=None, help="time-grid shift (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", action="store_true", help="write every image as OUT/images/<index>.png")
    p.add_argument("--npz", action="store_true", help="write the ADM-style OUT/samples.npz")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--grid-size", type=int, default=64)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    setup_logging(None)
    try:
        return run_sample(args)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
