"""Argument checks with errors that name the offending argument (never a crash in a kernel)."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterable, Iterator

import torch

from ._constants import FLOAT_DTYPES, INDEX_DTYPES  # noqa: F401  (re-exported: defined once there)


def check_real(op: str, name: str, value: object) -> float:
    """``value`` as a float when it is a real Python number (int or float; not a bool, string or
    tensor) — the same rule on every backend.  Raises ``TypeError`` naming ``name``; range checks are
    the caller's."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: `{name}` must be a real number, got {type(value).__name__}")
    return float(value)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``t`` is a tensor of the given rank/dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(
                f"{op}: `{name}` must have rank {' or '.join(map(str, allowed))}, got shape {tuple(t.shape)}"
            )
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{op}: `{name}` must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the first tensor whose device differs from the first one's."""
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.device != v0.device:
            raise ValueError(f"{op}: `{k}` is on {v.device} but `{k0}` is on {v0.device}; move them to one device")


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: `{name}` must have shape {tuple(expected)}, got {tuple(t.shape)}")


CHECK_INDICES_ENV = "RECTOK_FAST_CHECK_INDICES"

# Index checks: the design (DESIGN.md, "hot paths never sync with the host").
#
# The eager functionals (gather_tokens, restore_tokens, patchify with ids_keep) check the *values* of
# their index tensors, which reads them back to the host: one device sync per call, about 11 per
# tokenizer micro-step.  Checks that need host values run once per data batch, where the indices are
# made, not in every op that consumes them:
#
# * by default (a caller handing the library its own indices) every eager functional checks, with an
#   error that names the argument;
# * code that builds the indices itself (the tokenizer trainer's masks and the benchmarks': argsort
#   of a permutation, valid by construction) or has checked them once per batch
#   (``check_index_range(..., force=True)``) runs the model under :func:`trusted_indices`, and the
#   per-op checks are skipped: zero syncs;
# * ``RECTOK_FAST_CHECK_INDICES=0`` turns them off everywhere; under ``torch.compile`` they never run
#   (the registered ops never check: their kernels are memory-safe for any index value).
_TRUSTED: contextvars.ContextVar[bool] = contextvars.ContextVar("rectok_fast_trusted_indices", default=False)


@contextlib.contextmanager
def trusted_indices(trusted: bool = True) -> Iterator[None]:
    """Within this block the eager index-value checks are skipped (``trusted=False`` re-enables them).

    Use it around code whose index tensors are valid by construction or were checked once for the
    batch (:func:`check_index_range` outside the block): the per-op checks would each read the
    indices back to the host.  Context-local (threads and asyncio tasks each have their own)."""
    token = _TRUSTED.set(trusted)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def index_checks_enabled() -> bool:
    """Whether eager functionals validate index values: ``RECTOK_FAST_CHECK_INDICES`` (default on)
    and not inside :func:`trusted_indices`.

    The check reads the indices back to the host (a device sync on CUDA).  The registered ops never
    check (they run inside compiled graphs): their kernels are memory-safe for any index value
    instead.  Read at every call.
    """
    if _TRUSTED.get():
        return False
    return os.environ.get(CHECK_INDICES_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def data_checks_active(t: torch.Tensor) -> bool:
    """True when a data-dependent (host-syncing) check of ``t`` should run: eager, not meta, not
    empty, and :func:`index_checks_enabled`."""
    return not (torch.compiler.is_compiling() or t.numel() == 0 or t.device.type == "meta") and index_checks_enabled()


def check_index_range(op: str, name: str, idx: torch.Tensor, upper: int, *, force: bool = False) -> None:
    """Raise ``ValueError`` when an index tensor has entries outside ``[0, upper)``.

    A host sync (one transfer of the min and max), so it runs only in eager functionals: skipped
    while tracing under ``torch.compile`` (the data-dependent check would cause a graph break),
    inside :func:`trusted_indices` and when ``RECTOK_FAST_CHECK_INDICES=0``.  ``force=True`` checks
    regardless of the last two (the once-per-batch check of a caller that then trusts the indices).
    """
    if torch.compiler.is_compiling() or idx.numel() == 0 or idx.device.type == "meta":
        return
    if not (force or index_checks_enabled()):
        return
    lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one reduction, one host transfer
    if lo < 0 or hi >= upper:
        raise ValueError(f"{op}: `{name}` has entries in [{lo}, {hi}], outside the valid range [0, {upper})")
