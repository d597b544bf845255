"""The training loaders' workers leave group-wide stop signals to the main process but still end on a
SIGTERM sent to them, so an interpreter exiting with a live loader iterator never hangs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from torch.utils.data import TensorDataset
    from rectok_fast.data.sampler import build_loader

    loader = build_loader(TensorDataset(torch.arange(64.0)), 4, num_workers=1, seed=0)
    it = iter(loader)  # kept alive: never shut down, as after an exception that holds the iterator
    next(it)
    worker = next(iter(it._workers))
    print("pgid", os.getpgid(worker.pid) != os.getpgid(0), flush=True)
    # the exit path: multiprocessing's atexit terminates (SIGTERM) and joins daemonic children
    """
)


def test_worker_leaves_the_group_and_exit_does_not_hang():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pgid True" in out.stdout
