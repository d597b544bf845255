"""Arguments shared by the training commands (thin layer over :mod:`rectok_fast.config`)."""

from __future__ import annotations

import argparse

from ..config import RunConfig, data_overrides, load_config, merge, parse_overrides, resolve_config_path
from ..errors import ConfigError
from ..utils.threads import add_threads_arg, apply_threads


def add_run_args(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument(
        "--config",
        default=default_config,
        help=f"YAML recipe: a path or a name under configs/ (default: {default_config})",
    )
    p.add_argument("--out", default=None, help="run directory (checkpoints, metrics.jsonl, images, export)")
    p.add_argument(
        "--data",
        default=None,
        help="'embedded' (scikit-image samples, no download), an ImageNet-style folder, or a file list (.txt)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps (the LR schedule is unchanged)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest.pt (bit-exact)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that already holds a run (its checkpoints, metrics and export are deleted)",
    )
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    add_threads_arg(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides (anywhere on the line), e.g. optim.blr=2e-4 data.global_batch_size=64",
    )


def config_from_args(args: argparse.Namespace, kind: str) -> RunConfig:
    over = merge(data_overrides(args.data), parse_overrides(args.overrides))
    top: dict = {}
    for k in ("out", "max_steps", "seed", "device"):
        v = getattr(args, k)
        if v is not None:
            top[k] = v
    if args.resume:
        top["resume"] = True
    if getattr(args, "overwrite", False):
        top["overwrite"] = True
    from ..config import load_yaml

    path = resolve_config_path(args.config)
    recipe_kind = load_yaml(path).get("kind", kind)
    if recipe_kind != kind:
        raise ConfigError(f"--config {args.config} is a {recipe_kind!r} recipe, not {kind!r}")
    return load_config(path, merge(over, {**top, "kind": kind}))


def run_training_cli(train_fn, *, prog: str, doc: str | None, default_config: str, kind: str, argv=None) -> dict:
    """The shared ``main`` of the training commands: parse the run arguments, train, always tear
    the process group down (also on Ctrl-C or an exception)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, default_config=default_config)
    # intermixed: `key=value` overrides may follow options (`--config X data.latents=Y --out Z k=v`)
    args = p.parse_intermixed_args(argv)
    cfg = config_from_args(args, kind=kind)
    apply_threads(args.threads)
    try:
        return train_fn(cfg)
    finally:
        from ..utils.distributed import cleanup

        cleanup()
