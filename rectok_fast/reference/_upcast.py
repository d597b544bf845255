"""The one ``upcast`` rule of the references: fp16/bf16/fp32 compute in fp32, fp64 stays fp64."""

from __future__ import annotations

import torch


def up(x: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """``x`` in its compute dtype: fp32 for fp16/bf16/fp32 when ``upcast``, fp64 kept (so gradcheck
    in fp64 stays meaningful); unchanged when not ``upcast``."""
    return x if (not upcast or x.dtype == torch.float64) else x.float()


def result(x: torch.Tensor) -> torch.Tensor:
    """A reduced loss's dtype: fp32, or fp64 when computed in fp64."""
    return x if x.dtype == torch.float64 else x.float()
