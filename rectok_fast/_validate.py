"""Argument checks with errors that name the offending argument (never a crash in a kernel)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


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
            raise ValueError(f"{op}: `{name}` must have rank {' or '.join(map(str, allowed))}, got shape {tuple(t.shape)}")
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


def check_index_range(op: str, name: str, idx: torch.Tensor, upper: int) -> None:
    """Raise ``ValueError`` when an index tensor has entries outside ``[0, upper)``.

    Skipped while tracing under ``torch.compile`` (the data-dependent check would cause a graph
    break); eager calls, which is where user mistakes show up first, always check.
    """
    if torch.compiler.is_compiling() or idx.numel() == 0 or idx.device.type == "meta":
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{op}: `{name}` has entries in [{lo}, {hi}], outside the valid range [0, {upper})")
