"""``rectok-fast``: the command-line entry point (each subcommand is also ``python -m <module>``)."""

from __future__ import annotations

import importlib
import sys

TRUST_FLAG = "--trust-remote-code"  # the same string as rectok_fast.utils.checkpoint.TRUST_FLAG (kept import-free)

COMMANDS = {
    "demo": (
        "rectok_fast.train.demo",
        "train a tiny tokenizer + DiT on bundled images, sample, report metrics (no download)",
    ),
    "train-tokenizer": ("rectok_fast.train.tokenizer", "train RecTok (stage 1 or 2) from a YAML recipe"),
    "stats": ("rectok_fast.train.stats", "per-channel latent mean/std of a tokenizer over a dataset"),
    "cache-latents": ("rectok_fast.train.cache_latents", "encode a dataset once into sharded posterior moments"),
    "train-dit": ("rectok_fast.train.dit", "train DiT^DH on cached latents or online tokenisation"),
    "sample": (
        "rectok_fast.eval.sample",
        "class-conditional sampling (Euler/Heun/SDE, CFG, autoguidance), PNG grid + .npz",
    ),
    "eval": (
        "rectok_fast.eval.evaluate",
        "PSNR/SSIM of a tokenizer; FID/IS of samples when torch-fidelity/clean-fid are available",
    ),
    "download": ("rectok_fast.hub", "fetch released weights by name into the Hugging Face cache, print the paths"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rectok-fast <command> [options]   (rectok-fast <command> --help for details)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [
        "",
        f"{TRUST_FLAG} (anywhere on the line): allow a full unpickle of checkpoint files that need globals",
        "  beyond the safe allow-list; such a file can run code, so only for files from a trusted source.",
        "",
        "Distributed: torchrun --nproc-per-node N -m <module> ... (modules: "
        + ", ".join(m for m, _ in COMMANDS.values())
        + ")",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    trust = TRUST_FLAG in argv
    argv = [a for a in argv if a != TRUST_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from rectok_fast import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"rectok-fast: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    if not trust:
        return _call(cmd, module, rest)
    from rectok_fast.utils.checkpoint import trusting_remote_code

    print(
        f"rectok-fast {cmd}: {TRUST_FLAG}: checkpoint files this command reads may be unpickled in full "
        "and can run code; each such load is logged",
        file=sys.stderr,
    )
    with trusting_remote_code(True):
        return _call(cmd, module, rest)


def _call(cmd: str, module, rest: list[str]) -> int:
    """``module.main(rest)``; weights named by something that resolves to nothing: one line, exit 2."""
    from rectok_fast.hub import PretrainedNotFoundError

    try:
        module.main(rest)
    except PretrainedNotFoundError as e:
        print(f"rectok-fast {cmd}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
