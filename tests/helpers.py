"""Shared test utilities (flash-attention's error rule, tolerances)."""

from __future__ import annotations

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_fa_rule(
    out: torch.Tensor, ref_same_dtype: torch.Tensor, ref_fp32: torch.Tensor, factor: float = 2.0, atol: float = 1e-6
) -> None:
    """flash-attention's rule for low precision: the kernel's error against the fp32 reference is
    at most ``factor`` times the error of the same-dtype PyTorch reference (plus a tiny atol)."""
    e_kernel = max_err(out, ref_fp32)
    e_ref = max_err(ref_same_dtype, ref_fp32)
    assert e_kernel <= factor * e_ref + atol, f"kernel error {e_kernel:.3e} > {factor} x reference error {e_ref:.3e}"


def _find_reference_dir():
    """Where the golden tensors of the original implementation live (``shared/reference``).

    ``RECTOK_FAST_REFERENCE_DIR`` wins; otherwise ``shared/`` beside the checkout (how CI lays it
    out) or inside it.
    """
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    candidates = [os.environ.get("RECTOK_FAST_REFERENCE_DIR", "")]
    candidates += [repo.parent / "shared" / "reference", repo / "shared" / "reference"]
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


def assert_same_nan_inf(fn, fn_ref, inputs, needs) -> tuple[torch.Tensor, list]:
    """``fn`` and ``fn_ref`` give the same forward value and gradients (of ``out.sum()`` with respect
    to the inputs flagged in ``needs``), NaN where the reference is NaN, Inf where it is Inf (values
    close, rtol 1e-5).  Returns the reference's (out, grads)."""
    results = []
    for f in (fn, fn_ref):
        xs = [x.detach().clone().requires_grad_(n) for x, n in zip(inputs, needs)]
        out = f(*xs)
        grads = torch.autograd.grad(out.sum(), [x for x in xs if x.requires_grad])
        results.append((out.detach(), list(grads)))
    (o1, g1), (o2, g2) = results
    for what, a, b in [("out", o1, o2)] + [(f"grad {i}", a, b) for i, (a, b) in enumerate(zip(g1, g2))]:
        a, b = a.double(), b.double()
        ok = (a == b) | (a.isnan() & b.isnan()) | ((a - b).abs() <= 1e-5 * (1 + b.abs()))
        assert a.shape == b.shape and bool(ok.all()), f"{what}: {a} vs reference {b}"
    return o2, g2


def row_pair_with_bad_values(M: int, D: int, n_bad: int, value: float, in_second: bool, masked: bool, seed: int):
    """Two (M, D) random rows tensors with ``n_bad`` entries of the second (or first) set to ``value``
    at random places, and an optional random (M,) bool mask: the inputs of the NaN/Inf fuzz tests."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(M, D, generator=g), torch.randn(M, D, generator=g)
    x = b if in_second else a
    for _ in range(n_bad):
        x[torch.randint(0, M, (1,), generator=g), torch.randint(0, D, (1,), generator=g)] = value
    mask = (torch.rand(M, generator=g) > 0.3) if masked else None
    return a, b, mask, g


def tiny_rectok_config(**kw):
    """The smallest RecTok the model tests train: 16-px images, 4×4 tokens of 4 channels, width-16 trunks."""
    from rectok_fast.models.rectok import RecTokConfig

    base = dict(
        img_size=16,
        patch_size=4,
        token_channels=4,
        encoder=(16, 1, 2),
        decoder=(16, 1, 2),
        sem_decoder=(16, 1, 2),
        teachers={"tiny": 8},
    )
    return RecTokConfig(**{**base, **kw})


# the smallest DiT^DH: 4 channels on a 4×4 grid, one encoder and one head block of width 32, 4 classes
TINY_DITDH = dict(in_channels=4, input_size=4, hidden_size=(32, 32), depth=(1, 1), num_heads=(2, 2), num_classes=4)
