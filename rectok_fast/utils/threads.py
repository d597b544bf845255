"""The CPU thread count of every command (``--threads``).

PyTorch starts one OpenMP thread per core.  On a machine that is already busy, oversubscribed
threads spin and a tiny model trains an order of magnitude slower than on one thread (issue 12
measured a tiny ``train-tokenizer`` on a loaded 2-core machine at 11.8 img/s with the default
threads against 158 img/s on one), so the default is all cores on an idle machine and one thread on
a loaded one.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

logger = logging.getLogger("rectok_fast")

THREADS_HELP = (
    "CPU threads for PyTorch (default: $OMP_NUM_THREADS when set, else all cores, or 1 when the machine is "
    "already busy: oversubscribed threads are far slower than one)"
)


def pick_threads(requested: int | None) -> int:
    """``requested``, else all cores unless the machine is already busy (then 1: oversubscribed
    OpenMP threads are far slower than one thread on a loaded machine)."""
    if requested:
        return requested
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return 1 if load >= n - 0.5 else n


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def apply_threads(requested: int | None) -> int:
    """Set PyTorch's intra-op thread count from ``--threads`` (or the default of :func:`pick_threads`).

    Without ``--threads``, an ``OMP_NUM_THREADS`` in the environment (torchrun sets 1 per rank) is kept.
    Returns the thread count in effect."""
    if requested is not None and requested < 1:
        from ..errors import ArgumentError

        raise ArgumentError(f"--threads {requested}: must be a positive integer")
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = pick_threads(requested)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    logger.debug("using %d CPU thread(s)", n)
    return n
