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
import errno
import glob
import io
import logging
import os
import pathlib
import pickle
import pickletools
import re
import secrets
import shutil
import socket
import time
import warnings
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, DiskFullError, UserError

logger = logging.getLogger("rectok_fast")

_STEP_RE = re.compile(r"step_(\d+)\.pt$")

# ----------------------------------------------------------------------------- trust policy

TRUST_FLAG = "--trust-remote-code"
"""The CLI flag (``rectok-fast --trust-remote-code CMD ...``) that allows a full unpickle."""


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """A file needs globals outside the allow-list; loading it in full could run code from it.

    ``unsafe_globals`` lists them (``module.name``), ``path`` is the file."""

    def __init__(self, message: str, *, path: str = "", unsafe_globals: tuple[str, ...] = ()):
        super().__init__(message)
        self.path = path
        self.unsafe_globals = tuple(unsafe_globals)


class DamagedCheckpointError(CheckpointError):
    """A file that is truncated, corrupt or no ``torch.save`` file at all (``path`` names it)."""

    def __init__(self, message: str, *, path: str = ""):
        super().__init__(message)
        self.path = path


def _first_byte(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1)
    except OSError:
        return b""


def _damaged(path: str, what: str, e: BaseException) -> DamagedCheckpointError:
    why = " ".join(str(e).split()).split(". This is an internal")[0]  # miniz's boilerplate
    why = why[:160] + "..." if len(why) > 160 else why or type(e).__name__
    try:
        size = f"{os.path.getsize(path)} bytes"
    except OSError:
        size = "unreadable"
    return DamagedCheckpointError(
        f"{what}: {path!r} ({size}) is truncated, corrupt or not a torch checkpoint: {why}", path=path
    )


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
    except (EOFError, zipfile.BadZipFile) as e:
        raise _damaged(path, what, e) from e
    except (KeyError, ValueError, IndexError) as e:  # the legacy reader on bytes that are no pickle
        if _is_zip(path) or _first_byte(path) == b"\x80" or _unsafe_globals(path):
            raise
        raise _damaged(path, what, e) from e
    except RuntimeError as e:  # the zip reader: "PytorchStreamReader failed reading zip archive ..."
        if "PytorchStreamReader" in str(e) or "zip archive" in str(e) or not _is_zip(path):
            raise _damaged(path, what, e) from e
        raise
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if not unsafe and not _is_zip(path) and _first_byte(path) != b"\x80":  # neither a zip nor a pickle
            raise _damaged(path, what, e) from None
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


# ----------------------------------------------------------------------------- atomic writes
#
# A file is written as ``.tmp_<host>_<pid>_<random><suffix>`` in its destination directory, fsync-ed,
# renamed over the destination and the directory fsync-ed.  The writer's host and pid in the name let
# :func:`remove_stale_temporaries` delete what a killed writer left behind without ever touching a
# temporary that a live process is still writing.  Files are created with mode 0o666 & ~umask (like
# any other file the user writes), not mkstemp's 0600.

_TMP_PREFIX = ".tmp_"
_TMP_RE = re.compile(r"^\.tmp_(?P<host>[A-Za-z0-9-]+)_(?P<pid>\d+)_[0-9a-f]+\.")
STALE_TMP_AGE_S = 3600.0
"""Any temporary unmodified for this long is stale (another host's, an unknown format, a hung writer)."""
DEAD_WRITER_GRACE_S = 30.0
"""A temporary of a process of this host that is gone is stale once unmodified for this long (a guard
against a live writer on another machine that shares this host name)."""


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _tmp_path(d: str, suffix: str) -> str:
    return os.path.join(d, f"{_TMP_PREFIX}{_host_tag()}_{os.getpid()}_{secrets.token_hex(4)}{suffix}")


def _create(path: str) -> int:
    """``O_CREAT | O_EXCL`` with mode 0o666 (the umask applies)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def remove_stale_temporaries(d: str, *, max_age_s: float = STALE_TMP_AGE_S) -> list[str]:
    """Delete the ``.tmp_*`` files a killed writer left in ``d``; returns the removed paths.

    A temporary is stale when its writer (host + pid in the name) is this host, that process is gone
    and the file is unmodified for :data:`DEAD_WRITER_GRACE_S`, or -- whoever wrote it -- when it was
    last modified more than ``max_age_s`` ago (a live writer keeps touching it).  The temporary of a
    process that is still writing is never removed."""
    removed: list[str] = []
    try:
        names = os.listdir(d)
    except OSError:
        return removed
    host, now = _host_tag(), time.time()
    for n in names:
        if not n.startswith(_TMP_PREFIX):
            continue
        p = os.path.join(d, n)
        m = _TMP_RE.match(n)
        try:
            age = now - os.stat(p).st_mtime
            stale = age > max_age_s
            if not stale and m and m.group("host") == host:
                stale = age > DEAD_WRITER_GRACE_S and not _pid_alive(int(m.group("pid")))
            if stale and os.path.isfile(p):
                os.remove(p)
                removed.append(p)
        except OSError:
            continue
    for p in removed:
        logger.warning("removed a stale temporary left by an interrupted write: %s", p)
    return removed


def _disk_full(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


class _WriteRecorder(io.RawIOBase):
    """A binary file that remembers the first ``OSError`` of a write (``torch.save`` turns it into an
    opaque ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``)."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return False


def _atomic_write(path: str, write, suffix: str) -> None:
    """Write ``path`` through ``write(tmp_path)`` into a temporary beside it, fsync, rename, fsync the
    directory.  On any failure the temporary is removed and ``path`` (the previous version) is left
    as it was; a full disk raises :class:`~rectok_fast.errors.DiskFullError` naming ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = _tmp_path(d, suffix)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, Exception) and _disk_full(e):
            raise DiskFullError(
                f"no space left on device while writing {path} (the previous file, if any, is unchanged)", path
            ) from e
        raise
    _fsync_dir(d)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (temporary in the same dir + fsync + ``os.replace`` + fsync
    of the directory).  Raises :class:`~rectok_fast.errors.DiskFullError` when the disk fills up."""

    def write(tmp: str) -> None:
        with os.fdopen(_create(tmp), "wb") as f:
            rec = _WriteRecorder(f)
            try:
                torch.save(obj, rec)
                f.flush()
            except Exception as e:
                if rec.error is not None and rec.error is not e:
                    raise rec.error from e
                raise

    _atomic_write(path, write, ".pt")


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
    """``dst`` becomes a copy of ``src`` atomically: a hard link when the file system allows (same
    inode), else a byte copy; the directory is fsync-ed."""
    d = os.path.dirname(os.path.abspath(dst))
    tmp = _tmp_path(d, ".pt")
    try:
        try:
            os.link(src, tmp)  # cheap: same inode, then an atomic rename
        except OSError:
            with open(src, "rb") as fi, os.fdopen(_create(tmp), "wb") as fo:
                shutil.copyfileobj(fi, fo)
                fo.flush()
                os.fsync(fo.fileno())
        os.replace(tmp, dst)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, Exception) and _disk_full(e):
            raise DiskFullError(f"no space left on device while writing {dst}", dst) from e
        raise
    _fsync_dir(d)


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
    remove_stale_temporaries(ckpt_dir)
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
        raise CheckpointError(
            f"load_checkpoint: {path!r} holds a {type(state).__name__}, not a training checkpoint dict"
        )
    return state


def _unreadable(e: BaseException) -> bool:
    """A load failure that means a damaged file (truncated zip, short read), not a refused or bad one."""
    if isinstance(e, UnsafeCheckpointError):  # needs globals: a refusal (opt in); none named: garbage bytes
        return not e.unsafe_globals
    if isinstance(e, (DamagedCheckpointError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError)):
        return True
    return isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError))


def _describe(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return (msg[:160] + "...") if len(msg) > 160 else msg or type(e).__name__


def load_latest_checkpoint(
    out_dir: str, map_location: str | torch.device = "cpu", *, trust_remote_code: bool | None = None
) -> tuple[str, dict] | None:
    """The newest intact checkpoint of a run: ``(path, state)``, or ``None`` when there is none.

    Tries ``OUT/checkpoints/latest.pt``, then the ``step_*.pt`` files newest first, skipping any that
    is the same file as one already found damaged (``latest.pt`` is a hard link of its step file).
    A damaged file (truncated, not a zip, short read) logs a warning saying what is wrong and which
    file is used instead; when every file is damaged, :class:`~rectok_fast.errors.CheckpointError`.
    Refusals of the trust policy are never skipped over."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    remove_stale_temporaries(ckpt_dir)
    cands = [os.path.join(ckpt_dir, "latest.pt")] + [p for _, p in reversed(list_checkpoints(ckpt_dir))]
    cands = [p for p in cands if os.path.isfile(p)]
    if not cands:
        return None
    bad: list[tuple[str, str]] = []
    for p in cands:
        if any(os.path.samefile(p, b) for b, _ in bad):
            continue
        try:
            state = load_checkpoint(p, map_location=map_location, trust_remote_code=trust_remote_code)
        except Exception as e:
            if not _unreadable(e):
                raise
            bad.append((p, _describe(e)))
            logger.warning("checkpoint %s is damaged (truncated or corrupt: %s); trying an older one", p, bad[-1][1])
            continue
        if bad:
            logger.warning(
                "resuming from %s (step %s) instead of the damaged %s",
                p,
                state.get("step"),
                ", ".join(b for b, _ in bad),
            )
        return p, state
    raise CheckpointError(
        f"no intact checkpoint under {ckpt_dir}: "
        + "; ".join(f"{os.path.basename(b)}: {why}" for b, why in bad)
        + " (start afresh with --overwrite)"
    )


def export_safetensors(state_dict: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Inference weights to safetensors (contiguous CPU tensors, shared storage broken), atomically
    (temporary + fsync + rename + fsync of the directory; mode from the umask)."""
    from safetensors.torch import save

    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    data = save(sd, metadata=metadata)

    def write(tmp: str) -> None:
        with os.fdopen(_create(tmp), "wb") as f:
            f.write(data)

    _atomic_write(path, write, ".safetensors")


def save_export(
    directory: str | os.PathLike,
    model_type: str,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """A model export (what ``save_pretrained`` writes): ``directory/config.json`` holding
    ``{"model_type": model_type, **config}`` and ``directory/model.safetensors``, each written atomically
    (:func:`export_safetensors`)."""
    import json

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    text = json.dumps({"model_type": model_type, **config}, indent=2).encode()

    def write(tmp: str) -> None:
        with os.fdopen(_create(tmp), "wb") as f:
            f.write(text)

    _atomic_write(os.path.join(directory, "config.json"), write, ".json")
    export_safetensors(state_dict, os.path.join(directory, "model.safetensors"), metadata=metadata)


# ----------------------------------------------------------------------------- noise-stream record

NOISE_STREAM_KEY = "noise_stream"
"""Key of a training checkpoint's record of the in-kernel noise stream (``rectok_fast.ops.noise_stream_info()``)."""


class NoiseStreamWarning(UserWarning):
    """A resumed checkpoint was written under another in-kernel noise stream (or records none)."""


def check_noise_stream(state: dict, current: dict, *, mode: str | None = None, path: str = "") -> bool:
    """Compare the noise stream a training checkpoint recorded (``state["noise_stream"]``, written from
    :func:`rectok_fast.ops.noise_stream_info`: stream version and Philox rounds) with ``current``.

    When it differs, or the checkpoint records none, warn once (one :class:`NoiseStreamWarning` and one
    log line): the same seeds now give other noise, so the resumed run is not bit-exact with the
    original one.  ``mode``: this run's noise mode; when it and the recorded ``state["noise_mode"]`` are
    both ``"materialized"`` the in-kernel stream never reached the loss and nothing is compared.
    Returns True when the streams match (or do not matter)."""
    if mode == "materialized" and state.get("noise_mode") == "materialized":
        return True
    recorded = state.get(NOISE_STREAM_KEY)
    if isinstance(recorded, dict) and dict(recorded) == dict(current):
        return True
    what = "records no noise stream" if recorded is None else f"was written under noise stream {recorded}"
    msg = (
        f"resuming {path or 'a checkpoint'}: it {what}, this build's in-kernel noise stream is {dict(current)}; "
        "the noise from here on differs from the original run's (resume is not bit-exact across noise-stream versions)"
    )
    logger.warning(msg)
    warnings.warn(msg, NoiseStreamWarning, stacklevel=2)
    return False
