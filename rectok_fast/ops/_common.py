"""Old name of :mod:`rectok_fast.ops._rowloss` (the row-loss chain), kept as a thin alias for
callers that still import it (the compile-only kernel report); new code imports ``_rowloss``."""

from __future__ import annotations

from .. import _backend, _constants
from . import _rowloss

#: the interpreter predicate under its old name
compile_for_interpreter = _backend.triton_interpret


def kernel_backend(op: str, backend: str, chosen: str, *tensors) -> str:
    """Old two-step dtype check; :func:`rectok_fast._backend.resolve_backend` with ``kernel_dtypes`` does it now."""
    if chosen != "triton":
        return chosen
    return _backend.resolve_backend(op, backend, *tensors, kernel_dtypes=_constants.KERNEL_DTYPES)


def __getattr__(name: str) -> object:
    """Every other name: the row-loss chain's (``row_loss_fwd``, ...) or the shared dtype tuples."""
    for module in (_rowloss, _constants):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
