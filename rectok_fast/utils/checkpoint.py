"""Atomic checkpoints: write to a temporary file in the same directory, fsync, ``os.replace``.

Layout under ``OUT/checkpoints/``: ``step_00001000.pt`` ... (the last ``keep_last`` are kept, plus every
milestone, i.e. steps that are multiples of ``milestone_every``) and ``latest.pt``, which always holds
a complete checkpoint (a crash mid-save leaves the previous one intact and no partial file behind).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from typing import Any

import torch

_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (tmp file in the same dir + fsync + ``os.replace``)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(d)


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_copy(src: str, dst: str) -> None:
    d = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=d)
    os.close(fd)
    try:
        os.remove(tmp)
        try:
            os.link(src, tmp)  # cheap: same inode, then an atomic rename
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """``[(step, path), ...]`` sorted by step for the ``step_*.pt`` files in ``ckpt_dir``."""
    out = []
    for p in glob.glob(os.path.join(ckpt_dir, "step_*.pt")):
        m = _STEP_RE.search(p)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(
    state: dict,
    out_dir: str,
    step: int,
    *,
    keep_last: int = 3,
    milestone_every: int | None = None,
) -> str:
    """Write ``state`` as ``out_dir/checkpoints/step_{step}.pt`` and ``latest.pt`` (both atomically),
    then delete old non-milestone checkpoints beyond the last ``keep_last``.  Returns the step path.
    Call it on one rank only (see :func:`rectok_fast.utils.distributed.is_main`)."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    path = os.path.join(ckpt_dir, f"step_{step:08d}.pt")
    atomic_torch_save(state, path)
    _atomic_copy(path, os.path.join(ckpt_dir, "latest.pt"))
    if keep_last is not None and keep_last > 0:
        ckpts = list_checkpoints(ckpt_dir)
        removable = [(s, p) for s, p in ckpts if not (milestone_every and s % milestone_every == 0)]
        for _, p in removable[:-keep_last]:
            if p != path:
                os.remove(p)
    return path


def latest_checkpoint(out_dir: str) -> str | None:
    """``out_dir/checkpoints/latest.pt`` when it exists (else the newest ``step_*.pt``, else None)."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    p = os.path.join(ckpt_dir, "latest.pt")
    if os.path.exists(p):
        return p
    ck = list_checkpoints(ckpt_dir)
    return ck[-1][1] if ck else None


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint (a dict; RNG states and optimizer included, hence ``weights_only=False``)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def export_safetensors(state_dict: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Inference weights to safetensors (contiguous CPU tensors, shared storage broken), atomically."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".safetensors", dir=d)
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
