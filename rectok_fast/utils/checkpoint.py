"""Atomic checkpoints and the one policy for reading any ``torch.save`` file we are handed.

Layout under ``OUT/checkpoints/``: ``step_00001000.pt`` ... (the last ``keep_last`` are kept, plus every
milestone, i.e. steps that are multiples of ``milestone_every``) and ``latest.pt``, which always holds
a complete checkpoint (a crash mid-save leaves the previous one intact and no partial file behind).

**Trust policy** (:func:`safe_torch_load`): every file is read with ``torch.load(weights_only=True)``,
which never runs code from the file.  The only globals allowed beyond torch's own are those the
released checkpoints pickle: ``argparse.Namespace`` (their ``args``), ``pathlib`` paths and NumPy
scalars / dtypes (:data:`SAFE_GLOBALS`), allow-listed for the duration of one load only.  A file that
needs anything else fails with :class:`UnsafeCheckpointError` naming the globals.  A full unpickle
happens only on an explicit opt-in (``trust_remote_code=True`` on the loaders, ``rectok-fast
--trust-remote-code`` on the CLI), and it logs and warns every time.  Our own training checkpoints
hold only tensors, numbers, strings and plain containers, so they load under the same policy.

This module sits in the leaf layer (it imports only torch, numpy and the standard library) so that
both the model loaders (:mod:`rectok_fast.models.loading`) and training resume use the same policy.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import contextlib
import glob
import io
import logging
import os
import pathlib
import pickle
import pickletools
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("rectok_fast")

_STEP_RE = re.compile(r"step_(\d+)\.pt$")

# ----------------------------------------------------------------------------- trust policy

TRUST_FLAG = "--trust-remote-code"
"""The CLI flag (``rectok-fast --trust-remote-code CMD ...``) that allows a full unpickle."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A file needs globals outside the allow-list; loading it in full could run code from it.

    ``unsafe_globals`` lists them (``module.name``), ``path`` is the file."""

    def __init__(self, message: str, *, path: str = "", unsafe_globals: tuple[str, ...] = ()):
        super().__init__(message)
        self.path = path
        self.unsafe_globals = tuple(unsafe_globals)


class TrustRemoteCodeWarning(UserWarning):
    """Issued every time a file is unpickled in full because the caller opted in."""


def _numpy_safe_globals() -> list:
    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    scalar = multiarray.multiarray.scalar
    out: list = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype
    if dtypes is not None:
        out += [c for c in vars(dtypes).values() if isinstance(c, type) and issubclass(c, np.dtype)]
    return out


def _pathlib_safe_globals() -> list:
    out: list = []
    for name in ("PurePath", "PurePosixPath", "PureWindowsPath", "Path", "PosixPath", "WindowsPath"):
        cls = getattr(pathlib, name)
        if os.name != "nt" and name == "WindowsPath":
            cls = pathlib.PureWindowsPath  # a Windows-written path cannot be instantiated here
        if os.name == "nt" and name == "PosixPath":
            cls = pathlib.PurePosixPath
        out += [(cls, f"pathlib.{name}"), (cls, f"pathlib._local.{name}")]  # Python >= 3.13 spells pathlib._local
    return out


SAFE_GLOBALS: list = [argparse.Namespace, *_pathlib_safe_globals(), *_numpy_safe_globals()]
"""Globals allowed beyond torch's defaults: what the released checkpoints pickle besides tensors
(``argparse.Namespace``, ``pathlib`` paths, NumPy scalar and dtype reconstruction).  NumPy *arrays*
are not on the list (their reconstruction is a general object protocol)."""

_TRUST_DEFAULT = False
_NDARRAY_GLOBALS = {
    "numpy.ndarray",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
}


@contextlib.contextmanager
def trusting_remote_code(enabled: bool = True) -> Iterator[None]:
    """Within the block, loaders called with ``trust_remote_code=None`` (the default) use ``enabled``.

    The CLI enters it for ``--trust-remote-code``; library callers pass ``trust_remote_code=True``."""
    global _TRUST_DEFAULT
    before, _TRUST_DEFAULT = _TRUST_DEFAULT, bool(enabled)
    try:
        yield
    finally:
        _TRUST_DEFAULT = before


def _allowed_names() -> set[str]:
    names = set()
    for g in SAFE_GLOBALS:
        names.add(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}")
    return names


def _pickle_globals(f: io.BufferedReader) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in a (possibly multi-part) raw pickle stream,
    read from the opcodes only (nothing is executed)."""
    found: list[str] = []
    size = os.fstat(f.fileno()).st_size
    while f.tell() < size:
        strings: list[str] = []
        memo: dict[int, Any] = {}
        last: Any = None
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":  # protocols 0-2 spell Python 2 names (__builtin__.exec)
                    mod, _, name = str(arg).partition(" ")
                    mod, name = _compat_pickle.NAME_MAPPING.get((mod, name), (mod, name))
                    found.append(f"{_compat_pickle.IMPORT_MAPPING.get(mod, mod)}.{name}")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(arg)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = last
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
                    strings.append(memo[arg])
                last = arg
                if op.name == "STOP":
                    break
        except Exception:  # not a pickle (or the tensor bytes after a legacy header): stop scanning
            break
    return list(dict.fromkeys(found))


def _unsafe_globals(path: str) -> list[str]:
    """Globals the file needs that are neither torch's defaults nor :data:`SAFE_GLOBALS`."""
    allowed = _allowed_names()
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (non-zip) torch file or a raw pickle: read the opcodes ourselves
        try:
            with open(path, "rb") as f:
                found = _pickle_globals(f)
        except OSError:
            return []
        defaults = {
            f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}" for g in _torch_default_globals()
        }
        names = [n for n in found if n not in defaults and not n.startswith("torch.")]
    return [n for n in names if n not in allowed]


def _torch_default_globals() -> list:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return [v for v in _get_allowed_globals().values() if not isinstance(v, str)]
    except Exception:
        return []


def _is_zip(path: str) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def safe_torch_load(
    path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    trust_remote_code: bool | None = None,
    what: str = "torch.load",
    mmap: bool = False,
) -> Any:
    """``torch.load`` under the package's trust policy (see the module docstring).

    ``path``: a file written by ``torch.save``.  ``trust_remote_code``: ``True`` unpickles the file
    in full (it may run code; logged and warned), ``False`` never does, ``None`` follows
    :func:`trusting_remote_code` (off unless the CLI got ``--trust-remote-code``).  ``what`` names
    the caller in messages.  ``mmap`` maps zip-format files instead of reading them.
    Raises :class:`UnsafeCheckpointError` naming the globals a file needs beyond the allow-list.
    """
    path = os.fspath(path)
    trust = _TRUST_DEFAULT if trust_remote_code is None else bool(trust_remote_code)
    mmap = bool(mmap) and _is_zip(path)
    if trust:
        msg = (
            f"{what}: unpickling {path!r} in full because trust_remote_code=True / {TRUST_FLAG} was given; "
            "any code in the file runs now, so only do this for files from a source you trust"
        )
        logger.warning(msg)
        warnings.warn(msg, TrustRemoteCodeWarning, stacklevel=2)
        return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if unsafe:
            msg = (
                f"{what}: refusing to load {path!r}: it needs the global(s) {', '.join(unsafe)}, which are not "
                "on the safe allow-list (tensors, plain containers, argparse.Namespace, pathlib paths, NumPy "
                "scalars/dtypes); unpickling them could run code from the file."
            )
        else:
            reason = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            msg = f"{what}: refusing to load {path!r}: the safe loader (weights_only=True) cannot read it ({reason or e})."
        if unsafe and set(unsafe) <= _NDARRAY_GLOBALS:
            msg += (
                " If it is a training checkpoint written by an older rectok_fast (the NumPy RNG state was"
                " stored as an ndarray), it loads only with the opt-in below; the next checkpoint it writes"
                " is in the safe format."
            )
        msg += f" If you trust the file's source, pass trust_remote_code=True (CLI: rectok-fast {TRUST_FLAG} ...)."
        raise UnsafeCheckpointError(msg, path=path, unsafe_globals=tuple(unsafe)) from None


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


def load_checkpoint(
    path: str, map_location: str | torch.device = "cpu", *, trust_remote_code: bool | None = None
) -> dict:
    """Load a training checkpoint under the trust policy (:func:`safe_torch_load`).

    Ours hold only tensors, numbers, strings and plain containers (RNG states included), so they
    load without any opt-in; checkpoints written before that format need ``trust_remote_code=True``."""
    state = safe_torch_load(
        path, map_location=map_location, trust_remote_code=trust_remote_code, what="load_checkpoint"
    )
    if not isinstance(state, dict):
        raise TypeError(f"load_checkpoint: {path!r} holds a {type(state).__name__}, not a training checkpoint dict")
    return state


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
