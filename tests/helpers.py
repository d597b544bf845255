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


def _find_reference_dir():
    """Where the golden tensors of the original implementation live (``shared/reference``).

    ``RECTOK_FAST_REFERENCE_DIR`` wins; otherwise ``shared/`` beside the checkout (how CI lays it
    out), inside it, or the workplace's ``/work/shared``.
    """
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    candidates = [os.environ.get("RECTOK_FAST_REFERENCE_DIR", "")]
    candidates += [repo.parent / "shared" / "reference", repo / "shared" / "reference", "/work/shared/reference"]
    for c in candidates:
        if c and (Path(c) / "golden_rectok_tiny.pt").exists():
            return Path(c)
    return None


REFERENCE_DIR = _find_reference_dir()
REFERENCE_SKIP = "golden reference tensors not found: set RECTOK_FAST_REFERENCE_DIR to shared/reference"


def reference_file(name: str):
    """Path of a reference file; skips the calling test (with the reason) when the directory is absent."""
    import pytest

    if REFERENCE_DIR is None or not (REFERENCE_DIR / name).exists():
        pytest.skip(REFERENCE_SKIP)
    return REFERENCE_DIR / name


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ‖a − b‖ / ‖b‖ in fp64 (the golden-tensor criterion, ≤ 1e-5)."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
