"""Launch arithmetic shared by the Triton launchers, without importing triton.

``triton.cdiv`` / ``triton.next_power_of_2`` in plain Python, so that an op module can be imported
(and its reference path run) where triton is absent; the kernels themselves are imported on the
first launch through :func:`rectok_fast._backend.kernels`.
"""

from __future__ import annotations

import torch


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints (``triton.cdiv``)."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` for ``n >= 1``, 0 for 0 (as ``triton.next_power_of_2``)."""
    n = int(n)
    return n if n <= 1 else 1 << (n - 1).bit_length()


def acc_dtype(dtype: torch.dtype):
    """The ``ACC`` constexpr of the noise kernels: ``tl.float64`` for fp64 data, else ``tl.float32``."""
    import triton.language as tl  # a launch-time import: triton is optional until a kernel runs

    return tl.float64 if dtype == torch.float64 else tl.float32


__all__ = ["acc_dtype", "cdiv", "next_power_of_2"]
