"""``rectok-fast sample``: class-conditional samples from a DiT^DH, decoded by the tokenizer.

    rectok-fast sample --dit runs/dit --tokenizer runs/tok --out samples/ --num-images 64 --steps 50
    # the released models by name (fetched into the Hugging Face cache; latent statistics from `rectok-fast stats`):
    rectok-fast sample --pretrained ditdh-xl-600e --tokenizer rectok-decft --latent-stats tok_stats/ \
        --guide ditdh-s-30e --scale 1.29 --steps 149 --out samples/
    # the 50k-image FID protocol on 8 GPUs (each rank takes every 8th chunk of --batch-size images; the
    # results do not depend on the number of ranks: sample i always uses noise seeded by (seed, i)):
    torchrun --nproc-per-node 8 -m rectok_fast.eval.sample --dit runs/ditdh_xl --tokenizer runs/tok \\
        --num-images 50000 --steps 149 --guidance autoguidance --scale 1.29 --guide-model runs/ditdh_s \\
        --out samples/xl_ag --npz --no-grid

Images are written as they are decoded, as uint8 shards ``OUT/shards/<start>-<end>.npz`` (one per
``--batch-size`` indices; nothing is held in memory): an interrupted run (Ctrl-C, a lost node) re-run
with the same command continues from the shards on disk and gives the same bytes as an uninterrupted
run, on any number of ranks (``--overwrite`` starts afresh).  At the end: ``OUT/grid.png`` (unless
``--no-grid``), ``OUT/images/<index>.png`` with ``--png``, and the ADM-style ``OUT/samples.npz``
(``arr_0``: (N, H, W, 3) uint8, ``arr_1``: labels) with ``--npz``.  ``--scale 1.0,1.3,1.5`` samples
the same noise at each guidance scale into ``OUT/scale-1/``, ``OUT/scale-1.3/``, ... (``rectok-fast
eval --samples OUT`` reports each).  Labels: ``i % num_classes`` (balanced), or ``--classes 1,7,207``.
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import torch

from ..errors import ArgumentError, DataError, PathError, RunDirError
from ..hub import resolve_pretrained
from ..models.loading import load_dit, load_tokenizer
from ..sampling import sample
from ..utils import write_json
from ..utils.distributed import barrier, cleanup, init_distributed
from ..utils.images import save_grid, to_uint8_hwc
from ..utils.log import progress_bar, setup_logging
from ..utils.threads import add_threads_arg, apply_threads

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


# ----------------------------------------------------------------------------- incremental output
#
# The images of index range [start, end) (chunk k of --batch-size images: start = k * batch_size) go to
# one uint8 shard ``OUT/shards/<start>-<end>.npz`` (``arr_0`` (n, H, W, 3), ``arr_1`` labels) written
# atomically as soon as the chunk is decoded.  Chunk k runs on rank k % world_size, its noise is seeded
# by (seed, i) per image and its solver generator by (seed, start), so a chunk's pixels depend on
# neither the number of ranks nor on which chunks were done before: an interrupted run re-run with the
# same command (any number of ranks) skips the shards on disk and ends with the same bytes.

MANIFEST_KEYS = (
    "dit", "tokenizer", "latent_stats", "guide_model", "guidance", "classes", "steps", "method",
    "interval", "shift", "seed", "batch_size", "scale",
)  # fmt: skip


def parse_scales(spec) -> list[float]:
    """``--scale 1.5`` or ``--scale 1.0,1.3,1.5`` -> a list of guidance scales."""
    if isinstance(spec, int | float):
        return [float(spec)]
    out = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            out.append(float(part))
        except ValueError:
            raise ArgumentError(f"--scale {spec!r}: {part!r} is not a number") from None
    if not out or len(set(out)) != len(out):
        raise ArgumentError(f"--scale {spec!r}: give one or more distinct numbers, e.g. 1.0,1.3,1.5")
    return out


def scale_dir(out: str, scale: float, scales: list[float]) -> str:
    """Where the images of ``scale`` go: ``OUT`` for a single scale, ``OUT/scale-<s>`` for several."""
    return out if len(scales) == 1 else os.path.join(out, f"scale-{scale:g}")


def chunks(n: int, batch: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch, n)) for s in range(0, n, batch)]


def shard_path(d: str, start: int, end: int) -> str:
    return os.path.join(d, "shards", f"{start:07d}-{end:07d}.npz")


def read_shard(path: str, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A shard's (images, labels), or ``None`` when it is missing, unreadable or of another size."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as z:
            a, y = z["arr_0"], z["arr_1"]
    except Exception:  # a partial write cannot happen (rename), but a copied or damaged file can
        return None
    return (a, y) if a.shape[0] == count and y.shape[0] == count and a.dtype == np.uint8 else None


def shard_ok(path: str, count: int) -> bool:
    """Whether ``path`` is a complete shard of ``count`` images, from the zip directory and the array
    headers only (a resumed 50k run does not read every finished shard back)."""
    import zipfile

    if not os.path.isfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            shapes = {}
            for key in ("arr_0", "arr_1"):
                with zf.open(f"{key}.npy") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shapes[key] = read(f)
    except Exception:
        return False
    (s0, _, d0), (s1, _, _) = shapes["arr_0"], shapes["arr_1"]
    return s0[:1] == (count,) and s1 == (count,) and d0 == np.uint8 and len(s0) == 4


def write_shard(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Atomic: a temporary file in the same directory, then a rename."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp_{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=images, arr_1=labels)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _manifest(args: argparse.Namespace, scale: float) -> dict:
    d = {k: getattr(args, k, None) for k in MANIFEST_KEYS}
    d["scale"] = scale
    d["interval"] = list(d["interval"]) if d["interval"] is not None else None
    return d


def prepare_dir(d: str, manifest: dict, overwrite: bool) -> int:
    """Create ``d/shards`` for ``manifest`` (the options that determine the pixels).  Shards of another
    configuration are refused (or removed with ``--overwrite``).  Returns the number of shards kept."""
    import json
    import shutil

    sd = os.path.join(d, "shards")
    mpath = os.path.join(sd, "manifest.json")
    if overwrite and os.path.isdir(sd):
        shutil.rmtree(sd)
    if os.path.isfile(mpath):
        with open(mpath) as f:
            old = json.load(f)
        diff = sorted(k for k in manifest if old.get(k) != manifest[k])
        if diff:
            raise RunDirError(
                f"--out {d} holds samples of another configuration (differs in {', '.join(diff)}): "
                "pass --overwrite to replace them or choose another --out"
            )
    os.makedirs(sd, exist_ok=True)
    if not os.path.isfile(mpath):
        write_json(mpath, manifest)
    return sum(n.endswith(".npz") for n in os.listdir(sd))


def iter_shards(d: str, n: int, batch: int):
    """(images uint8 (b, H, W, 3), labels (b,)) of ``d``'s shards in index order."""
    for s, e in chunks(n, batch):
        got = read_shard(shard_path(d, s, e), e - s)
        if got is None:
            raise DataError(f"{shard_path(d, s, e)}: missing or damaged shard (re-run the sample command to redo it)")
        yield got


def write_npz_streaming(path: str, parts, n: int, hw: tuple[int, int]) -> str:
    """The ADM ``.npz`` (``arr_0`` (n, H, W, 3) uint8, ``arr_1`` labels) written part by part, never
    holding all images in memory; atomic (temporary file + rename)."""
    import zipfile

    tmp = f"{path}.tmp_{os.getpid()}"
    labels = []
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                hdr = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
                np.lib.format.write_array_header_1_0(f, {**hdr, "shape": (n, hw[0], hw[1], 3)})
                written = 0
                for a, y in parts:
                    f.write(np.ascontiguousarray(a).tobytes())
                    labels.append(y)
                    written += a.shape[0]
                if written != n:
                    raise DataError(f"{path}: {written} images for a header of {n}")
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.concatenate(labels) if labels else np.zeros(0, np.int64))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _write_pngs(d: str, start: int, images: np.ndarray, only_missing: bool = False) -> None:
    from PIL import Image

    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    for j, a in enumerate(images):
        f = os.path.join(d, "images", f"{start + j:06d}.png")
        if not (only_missing and os.path.exists(f)):
            Image.fromarray(a).save(f)


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
    scales = parse_scales(args.scale)
    n = args.num_images
    dirs = {s: scale_dir(args.out, s, scales) for s in scales}
    kept = 0
    if info.is_main:
        for s, d in dirs.items():
            kept += prepare_dir(d, _manifest(args, s), args.overwrite)
    barrier()
    mine = chunks(n, args.batch_size)[info.rank :: info.world_size]
    todo = [(c, s) for c in mine for s in scales if not shard_ok(shard_path(dirs[s], *c), c[1] - c[0])]
    done_imgs = sum(c[1] - c[0] for c in mine) * len(scales) - sum(c[1] - c[0] for c, _ in todo)
    total = sum(c[1] - c[0] for c in mine) * len(scales)
    if info.is_main and done_imgs:
        logger.info(
            "resuming: %d of this rank's %d images are already in the shards under %s", done_imgs, total, args.out
        )
    bar = progress_bar(total, "sample", enabled=info.is_main and not args.no_progress, initial=done_imgs)
    try:
        for (s0, s1), scale in [(c, s) for c in mine for s in scales]:
            d = dirs[scale]
            path = shard_path(d, s0, s1)
            if ((s0, s1), scale) not in todo:
                if args.png:  # a resumed run that now asks for PNGs
                    got = read_shard(path, s1 - s0)
                    _write_pngs(d, s0, got[0], only_missing=True)
                continue
            idx = list(range(s0, s1))
            y = torch.tensor([classes[i % len(classes)] for i in idx], dtype=torch.long)
            imgs = generate(
                dit,
                tok,
                idx,
                y,
                steps=args.steps,
                method=args.method,
                guidance=guidance,
                scale=scale,
                guide_model=guide,
                interval=args.interval,
                shift=args.shift,
                seed=args.seed,
            )
            u8 = to_uint8_hwc(imgs)
            del imgs
            write_shard(path, u8, y.numpy())
            if args.png:
                _write_pngs(d, s0, u8)
            bar.update(s1 - s0)
    except KeyboardInterrupt:
        bar.close()
        logger.warning("interrupted: the finished shards are kept; the same command resumes from them")
        raise
    bar.close()
    barrier()
    res: dict = {"num_images": n, "out": args.out, "scales": {}}
    if info.is_main:
        cfg = {k: v for k, v in vars(args).items()}
        cfg["scales"] = scales
        for scale, d in dirs.items():
            r: dict = {"out": d, "shards": os.path.join(d, "shards")}
            first = next(iter_shards(d, n, args.batch_size), None)
            if first is None:
                raise RunDirError(f"--out {d}: no shards were written")
            hw = first[0].shape[1:3]
            if args.npz:
                r["npz"] = write_npz_streaming(
                    os.path.join(d, "samples.npz"), iter_shards(d, n, args.batch_size), n, hw
                )
            if not args.no_grid and args.grid_size > 0:
                parts, got = [], 0
                for a, _ in iter_shards(d, n, args.batch_size):
                    parts.append(a[: args.grid_size - got])
                    got += len(parts[-1])
                    if got >= args.grid_size:
                        break
                g = torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).float() / 255.0
                r["grid"] = save_grid(g, os.path.join(d, "grid.png"))
            write_json(os.path.join(d, "sample_config.json"), {**cfg, "scale": scale})
            res["scales"][f"{scale:g}"] = r
        if len(scales) > 1:
            write_json(os.path.join(args.out, "sample_config.json"), cfg)
        else:
            res.update({k: v for k, v in r.items() if k in ("npz", "grid")})
    return res


def check_args(args: argparse.Namespace) -> None:
    """Range checks of the numeric options (:class:`~rectok_fast.errors.ArgumentError` naming the option)."""
    for opt, v in (("--num-images", args.num_images), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        if v < 1:
            raise ArgumentError(f"{opt} {v}: must be a positive integer")
    parse_scales(args.scale)
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
    p.add_argument(
        "--scale",
        default="1.0",
        help="guidance scale, or several (1.0,1.3,1.5): one output per scale, the same noise for each",
    )
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
    p.add_argument("--overwrite", action="store_true", help="discard the shards of an earlier run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_arg(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    setup_logging(None)
    apply_threads(args.threads)
    try:
        return run_sample(args)
    finally:
        cleanup()


if __name__ == "__main__":  # the rectok-fast CLI's error handling (one-line user errors, 143/130 on signals)
    from rectok_fast.cli import run_as_main

    run_as_main("sample")
