"""Shared test utilities (flash-attention's error rule, tolerances)."""

from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_fa_rule(out: torch.Tensor, ref_same_dtype: torch.Tensor, ref_fp32: torch.Tensor, factor: float = 2.0, atol: float = 1e-6) -> None:
    """flash-attention's rule for low precision: the kernel's error against the fp32 reference is
    at most ``factor`` times the error of the same-dtype PyTorch reference (plus a tiny atol)."""
    e_kernel = max_err(out, ref_fp32)
    e_ref = max_err(ref_same_dtype, ref_fp32)
    assert e_kernel <= factor * e_ref + atol, f"kernel error {e_kernel:.3e} > {factor} x reference error {e_ref:.3e}"
