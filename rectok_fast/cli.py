"""``rectok-fast``: the command-line entry point (each subcommand is also ``python -m <module>``)."""

from __future__ import annotations

import importlib
import sys

TRUST_FLAG = "--trust-remote-code"  # the same string as rectok_fast.utils.checkpoint.TRUST_FLAG (kept import-free)
DEBUG_FLAG = "--debug"  # anywhere on the line: user errors show their traceback too

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
        f"{DEBUG_FLAG} (anywhere on the line): print the traceback of an error, not only its one-line message.",
        "",
        "Errors in what you pass (config keys and values, files, checkpoints, arguments) end with one line",
        "'rectok-fast CMD: error: ...' and exit status 2; SIGTERM / SIGINT during training write a checkpoint",
        "and exit 143 / 130.",
        "",
        "Distributed: torchrun --nproc-per-node N -m <module> ... (modules: "
        + ", ".join(m for m, _ in COMMANDS.values())
        + ")",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    trust = TRUST_FLAG in argv
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a not in (TRUST_FLAG, DEBUG_FLAG)]
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
        return _call(cmd, module, rest, debug)
    from rectok_fast.utils.checkpoint import trusting_remote_code

    print(
        f"rectok-fast {cmd}: {TRUST_FLAG}: checkpoint files this command reads may be unpickled in full "
        "and can run code; each such load is logged",
        file=sys.stderr,
    )
    with trusting_remote_code(True):
        return _call(cmd, module, rest, debug)


def user_error_message(e: BaseException) -> str | None:
    """The one-line message of a user error (``None`` for anything else: a bug, which keeps its traceback).

    User errors: :class:`rectok_fast.errors.UserError` (config, data, paths, checkpoints, arguments,
    run directory, full disk), weights named by nothing (``PretrainedNotFoundError``), and the OS's
    missing / unreadable path and full-disk errors, which name their file."""
    import errno

    from rectok_fast.errors import UserError
    from rectok_fast.hub import PretrainedNotFoundError

    if isinstance(e, (UserError, PretrainedNotFoundError)):
        msg = str(e)
        if "Original Traceback" in msg:  # re-raised from a DataLoader worker: the worker's own message
            last = msg.strip().splitlines()[-1]
            head, _, rest = last.partition(": ")
            msg = rest if rest and head.endswith(type(e).__name__) else last
    elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = f"no space left on device while writing {e.filename or '(unknown file)'}"
    elif isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)) and e.filename:
        msg = f"{e.strerror or type(e).__name__}: {e.filename}"
    else:
        return None
    return " ".join(msg.split()) or type(e).__name__


def _end_progress_bars() -> None:
    """Close the tqdm bars an exception left open, so that the final message starts its own line."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:
            pass


def _call(cmd: str, module, rest: list[str], debug: bool = False) -> int:
    """``module.main(rest)``.  A user error ends with one stderr line ``rectok-fast CMD: error: ...`` and
    exit 2 (``--debug``: its traceback first); training stopped by SIGTERM / SIGINT: one line saying
    where the checkpoint is, exit 143 / 130.  Anything else is a bug and raises with its traceback."""
    import os
    import traceback

    from rectok_fast.errors import TrainingInterrupted

    try:
        module.main(rest)
    except TrainingInterrupted as e:
        _end_progress_bars()
        if debug:
            traceback.print_exc()
        if os.environ.get("RANK", "0") == "0":
            print(f"rectok-fast {cmd}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        _end_progress_bars()
        if debug:
            traceback.print_exc()
        print(f"rectok-fast {cmd}: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except Exception as e:
        msg = user_error_message(e)
        if msg is None:
            raise
        _end_progress_bars()
        if debug:
            traceback.print_exc()
        sys.stderr.flush()
        print(f"rectok-fast {cmd}: error: {msg}", file=sys.stderr)
        return 2
    return 0


def run_as_main(cmd: str) -> None:
    """``python -m <module>`` (e.g. under torchrun) behaves as ``rectok-fast CMD``: the same one-line
    user errors, ``--debug``, ``--trust-remote-code`` and the 143 / 130 exits of an interrupted run."""
    sys.exit(main([cmd, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
