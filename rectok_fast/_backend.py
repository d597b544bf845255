"""Backend selection shared by every functional in :mod:`rectok_fast.ops`.

Every fused functional takes ``backend="auto" | "triton" | "reference"`` (the C++ patch ops use
``"cpp"`` instead of ``"triton"``).  ``"auto"`` runs the fused path on CUDA tensors and the
reference otherwise.  The path that actually ran is recorded and can be read back with
:func:`rectok_fast.last_backend`; the first time an op runs on a given path a DEBUG log line
(logger ``rectok_fast``) says so.  Nothing here falls back silently: an explicit request for a
fused backend that cannot run raises.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("rectok_fast")

_LAST: dict[str, str] = {}
_LOGGED: set[tuple[str, str]] = set()

BACKENDS_TRITON = ("auto", "triton", "reference")
BACKENDS_CPP = ("auto", "cpp", "reference")


def triton_interpret() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton_interpret():
    from ._triton_compat import apply_interpreter_shim

    apply_interpreter_shim()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton ships with CUDA torch builds
        return False
    return True


def resolve_triton_backend(op: str, backend: str, *tensors: torch.Tensor | None) -> str:
    """Return ``"triton"`` or ``"reference"`` for ``op`` given the request and the inputs.

    ``"triton"`` on CPU tensors is only allowed under ``TRITON_INTERPRET=1`` (how CI tests the
    kernels); otherwise it raises, it never degrades silently.
    """
    if backend not in BACKENDS_TRITON:
        raise ValueError(f"{op}: backend must be one of {BACKENDS_TRITON}, got {backend!r}")
    # A plain loop, not ``bool(list)``: torch 2.11's dynamo cannot trace ``bool`` on a list.
    on_cuda = False
    for t in tensors:
        if t is None:
            continue
        if not t.is_cuda:
            on_cuda = False
            break
        on_cuda = True
    if backend == "auto":
        chosen = "triton" if (on_cuda and triton_available()) else "reference"
    elif backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' requested but triton is not importable")
        if not on_cuda and not triton_interpret():
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the "
                "kernels on the CPU through the Triton interpreter); use backend='reference' or 'auto'"
            )
        chosen = "triton"
    else:
        chosen = "reference"
    record(op, chosen)
    return chosen


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
