"""Backend selection shared by every functional in :mod:`rectok_fast.ops`: one resolver, one
interpreter predicate, one place that imports the Triton kernels.

Every fused functional takes ``backend="auto" | "triton" | "reference"`` (the C++ patch ops use
``"cpp"`` instead of ``"triton"``); :func:`resolve_backend` turns the request and the inputs into the
path that runs.  ``"auto"`` runs the fused path on CUDA tensors (Triton) or wherever the C++
extension has a kernel (C++), and the reference otherwise.  The path that actually ran is recorded
and can be read back with :func:`rectok_fast.last_backend`; the first time an op runs on a given
path a DEBUG log line (logger ``rectok_fast``) says so.  Nothing here falls back silently: an
explicit request for a fused backend that cannot run raises.

Triton is optional at import (it is a Linux-only dependency): nothing in :mod:`rectok_fast.ops`
imports it at module level.  The kernel modules (:mod:`rectok_fast.kernels`, which do) are imported
by :func:`kernels` on the first Triton launch, so ``backend="reference"`` (and ``"auto"`` on the
CPU) never needs triton, and ``backend="triton"`` without it raises a ``RuntimeError`` that says so.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger("rectok_fast")

_LAST: dict[str, str] = {}
_LOGGED: set[tuple[str, str]] = set()

BACKENDS_TRITON = ("auto", "triton", "reference")
BACKENDS_CPP = ("auto", "cpp", "reference")
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``).

    The one interpreter predicate: launch configurations follow it (the compile target), never the
    tensors' device, so the compile-only report (``python -m benchmarks.kernel_report``) sees the
    configurations a GPU run uses."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a finder that refuses triton, or a broken install
        return False


# Decided once at import without importing triton (``find_spec`` only locates it): dynamo reads a
# constant while tracing the resolver, and an import of triton happens only on a Triton launch.
_TRITON_FOUND = _find_triton()

if triton_interpret() and _TRITON_FOUND:
    from ._triton_compat import apply_interpreter_shim

    apply_interpreter_shim()


def triton_available() -> bool:
    """True when the ``triton`` package can be found (checked once, at import, without importing it)."""
    return _TRITON_FOUND


def kernels(name: str) -> ModuleType:
    """The Triton kernel module ``rectok_fast.kernels.<name>``, imported on first use (the first
    launch of an op).  Raises ``RuntimeError`` naming the module when triton cannot be imported."""
    try:
        return importlib.import_module(f"rectok_fast.kernels.{name}")
    except ImportError as e:
        raise RuntimeError(
            f"rectok_fast.kernels.{name} needs triton, which cannot be imported here ({e}); "
            "use backend='reference' (or 'auto' on the CPU)"
        ) from e


def _triton_unavailable(backend: str, tensors: tuple[torch.Tensor | None, ...]) -> str | None:
    """Why the Triton path cannot run for these inputs (None when it can)."""
    # A plain loop, not ``bool(list)``: torch 2.11's dynamo cannot trace ``bool`` on a list.
    on_cuda = False
    for t in tensors:
        if t is None:
            continue
        if not t.is_cuda:
            on_cuda = False
            break
        on_cuda = True
    if not _TRITON_FOUND:
        return "triton is not importable"
    if on_cuda:
        return None
    if backend == "triton" and triton_interpret():  # how CI runs the kernels on the CPU
        return None
    return "it needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU through the Triton interpreter)"


def resolve_backend(
    op: str,
    backend: str,
    *tensors: torch.Tensor | None,
    fused: str = "triton",
    unavailable: str | None = None,
    kernel_dtypes: tuple[torch.dtype, ...] | None = None,
    typed: tuple[torch.Tensor, ...] | None = None,
) -> str:
    """The path ``op`` runs on: ``fused`` (``"triton"`` or ``"cpp"``) or ``"reference"``.

    Args:
        op: the op's name (in errors and in :func:`last_backend`).
        backend: the caller's request, ``"auto"`` | ``fused`` | ``"reference"`` (else ``ValueError``).
        tensors: the inputs (None entries ignored); the Triton path needs them all on CUDA, or, for
            an explicit ``backend="triton"``, ``TRITON_INTERPRET=1``.
        fused: ``"triton"`` (the Triton ops) or ``"cpp"`` (the C++ extension's ops).
        unavailable: for ``fused="cpp"``: why the C++ op cannot run here (None when it can).
        kernel_dtypes: the dtypes the fused kernels take; an input of ``typed`` (default: ``tensors``)
            with another dtype runs the reference under ``"auto"`` and raises ``TypeError`` under
            ``backend=fused``.

    An explicit ``backend=fused`` that cannot run raises ``RuntimeError``; it never degrades.
    """
    allowed = ("auto", fused, "reference")
    if backend not in allowed:
        raise ValueError(f"{op}: backend must be one of {allowed}, got {backend!r}")
    if backend == "reference":
        chosen = "reference"
    else:
        why = _triton_unavailable(backend, tensors) if fused == "triton" else unavailable
        if why is not None and backend == fused:
            raise RuntimeError(f"{op}: backend={fused!r} requested but {why}; use backend='reference' or 'auto'")
        chosen = "reference" if why is not None else fused
        if chosen == fused and kernel_dtypes is not None:
            for t in typed if typed is not None else tensors:
                if t is not None and t.dtype not in kernel_dtypes:
                    if backend == fused:
                        names = "/".join(_DTYPE_NAMES.get(d, str(d)) for d in kernel_dtypes)
                        raise TypeError(f"{op}: backend={fused!r} supports {names} inputs, got {t.dtype}")
                    chosen = "reference"
    record(op, chosen)
    return chosen


def takes_fused_path(backend: str, *tensors: torch.Tensor | None, fused: str = "triton") -> bool:
    """Whether :func:`resolve_backend` picks the fused path for ``backend`` and these inputs, without
    recording or raising: for callers that prepare an op's inputs for its path (a seed for the
    in-kernel noise instead of a materialised tensor).  An explicit ``backend=fused`` is True (the op
    itself raises if it cannot run)."""
    if backend == fused:
        return True
    return backend == "auto" and fused == "triton" and _triton_unavailable(backend, tensors) is None


def record(op: str, chosen: str) -> None:
    """Record which path ``op`` ran on (readable with :func:`last_backend`), log it once.

    Nothing is recorded while dynamo traces: the mutation would only happen at trace time, and
    dynamo guards on the dict's contents, so a compiled function would recompile whenever another
    op (or its own first trace) changed them.
    """
    if torch.compiler.is_compiling():
        return
    _LAST[op] = chosen
    _LAST["*"] = chosen
    key = (op, chosen)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.debug("rectok_fast.%s runs on the %s path", op, chosen)


def last_backend(op: str | None = None) -> str | None:
    """The backend the last call of ``op`` (or of any op when ``op`` is None) ran on."""
    return _LAST.get("*" if op is None else op)
