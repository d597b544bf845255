"""Mini-model convergence (after Liger-Kernel's ``test/convergence``): a tiny RecTok and a tiny DiT^DH
trained 20 AdamW steps with every fused op on ``ops_backend="reference"`` versus the fused backends
give the same per-step losses and final parameters within a stated tolerance.

Both runs start from the same weights and see the same data and the same *materialised* randomness
(masks, flow times, posterior and flow noise, DiT x0 and label drop-out are drawn up front from fixed
seeds and passed in explicitly), so the only difference is which implementation of each op ran.
The fused side is the Triton kernels (and the C++ patch ops) on :func:`kernel_device`: under the
Triton interpreter on a CPU-only machine, compiled on a GPU.  Which path every op took is asserted,
so a silent fallback to the reference would fail the test.

Tolerance (fp32 throughout): the fused kernels compute the same formulas as the reference in
another summation order, with fused multiply-adds (the interpreter runs them as NumPy float32 array
code, a GPU as compiled code), so each op agrees with the reference to a few float32 ulps (~1e-7
relative), and twenty AdamW steps carry those differences on (Adam divides each gradient by its
running RMS, so a last-bit difference in a small gradient entry is not damped).  On the CPU
interpreter the largest drift after 20 steps at ``lr=3e-3`` was 1.2e-7 relative in a loss and
2.4e-7 absolute in a parameter.  The tolerances (losses ``rtol=1e-5``; parameters ``atol=1e-5``,
``rtol=1e-4``) leave room for a GPU's other reduction orders and nondeterministic cuDNN/cuBLAS
backward passes (not measured here: no GPU), and stay far below what a wrong op does: every
parameter moves by more than 1e-3 (checked, 100× ``atol``), and a run with a slightly different loss
fails the comparison (:func:`test_convergence_check_catches_a_wrong_fused_path`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY_DITDH, tiny_rectok_config

import rectok_fast
from rectok_fast import _backend
from rectok_fast.models.ditdh import DiTDH, label_drop_mask
from rectok_fast.models.rectok import RecTok

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 20
LR = 3e-3
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-5

TRITON_OPS_RECTOK = ("gather_tokens", "restore_tokens", "posterior_flow", "cosine_align_loss")
PATCH_OPS = ("patchify", "unpatchify")
TRITON_OPS_DIT = ("flow_matching_xt", "flow_matching_loss")


def _fused_backend(device: str) -> tuple[str, str]:
    """(ops_backend of the fused run, the path the patch ops then take).  ``"triton"`` everywhere the
    C++ patch ops can run (the CPU, or a CUDA build of the extension); on a GPU without the CUDA
    extension ``"auto"`` (Triton for the Triton ops, the reference patch ops)."""
    if device == "cpu" or rectok_fast.build_info()["cuda_extension_compiled"]:
        return "triton", "cpp"
    return "auto", "reference"


def _paths() -> dict[str, str]:
    return {k: v for k, v in _backend._LAST.items() if k != "*"}


def _assert_paths(paths: dict[str, str], expect: dict[str, str]) -> None:
    for op, path in expect.items():
        assert paths.get(op) == path, f"{op} ran on {paths.get(op)!r}, expected {path!r} (all: {paths})"


def _train(model, step_fn, batches) -> tuple[list[float], dict[str, torch.Tensor], dict[str, str]]:
    """``STEPS`` AdamW steps of ``step_fn(model, batch) -> loss``; per-step losses, final parameters and
    the path each op took."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    _backend._LAST.clear()
    losses = []
    for batch in batches:
        loss = step_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return losses, params, _paths()


def _assert_trained(ref, init: dict[str, torch.Tensor]) -> None:
    """The reference run lowered its loss and moved every parameter far beyond the tolerance."""
    losses, params, _ = ref
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-5:]) < 0.95 * sum(losses[:5]), f"the reference run did not train: {losses}"
    still = [k for k, p in params.items() if (p - init[k]).abs().max() <= 100 * PARAM_ATOL]
    assert not still, f"parameters that barely moved (the comparison says little about them): {still}"


def _assert_same_run(ref, fused) -> None:
    (l_ref, p_ref, _), (l_fused, p_fused, _) = ref, fused
    torch.testing.assert_close(torch.tensor(l_fused), torch.tensor(l_ref), rtol=LOSS_RTOL, atol=LOSS_ATOL)
    for name, p in p_ref.items():
        torch.testing.assert_close(
            p_fused[name], p, rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=lambda m, n=name: f"{n}: {m}"
        )


# ----------------------------------------------------------------------------- RecTok


def _tiny_rectok(device: str) -> RecTok:
    torch.manual_seed(0)
    return RecTok(tiny_rectok_config()).to(device).train()


def _rectok_batches(model: RecTok, device: str) -> list[dict]:
    """Everything random for each step, materialised once: images, teacher features, mask (K varies
    from step to step), flow times and both noises."""
    g = torch.Generator().manual_seed(1)
    B, N, C = 4, model.config.num_tokens, model.token_channels
    images = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    feats = torch.randn(8, N, 8, generator=g)
    out = []
    for i in range(STEPS):
        rows = torch.arange(B) + (i % 2) * B
        K = (9, 12, 16)[i % 3]
        mask = model.sample_mask(B, "cpu", num_kept=K, generator=g, mark_dynamic=False)
        out.append(
            {
                "images": images[rows].to(device),
                "feats": {"tiny": feats[rows].to(device)},
                "mask": type(mask)(mask.ids_keep.to(device), mask.ids_restore.to(device)),
                "t": torch.rand(B, generator=g).to(device),
                "noise": tuple(torch.randn(B, K, C, generator=g).to(device) for _ in range(2)),
            }
        )
    return out


def _rectok_step(model: RecTok, b: dict) -> torch.Tensor:
    out = model(b["images"], mask=b["mask"], t=b["t"], noise=b["noise"], teacher_features=b["feats"])
    return (out.reconstruction - b["images"]).square().mean() + 1e-3 * out.kl + out.sem_loss


def test_rectok_reference_vs_fused_training(kernel_device):
    fused_backend, patch_path = _fused_backend(kernel_device)
    base = _tiny_rectok(kernel_device)
    init = {k: v.detach().clone() for k, v in base.named_parameters()}
    batches = _rectok_batches(base, kernel_device)
    ref_model, fused_model = copy.deepcopy(base), copy.deepcopy(base)
    ref_model.ops_backend = "reference"
    fused_model.ops_backend = fused_backend
    ref = _train(ref_model, _rectok_step, batches)
    fused = _train(fused_model, _rectok_step, batches)
    _assert_paths(ref[2], dict.fromkeys(TRITON_OPS_RECTOK + PATCH_OPS, "reference"))
    _assert_paths(fused[2], {**dict.fromkeys(TRITON_OPS_RECTOK, "triton"), **dict.fromkeys(PATCH_OPS, patch_path)})
    _assert_trained(ref, init)
    _assert_same_run(ref, fused)


# ----------------------------------------------------------------------------- DiT^DH


def _tiny_dit(device: str) -> DiTDH:
    torch.manual_seed(0)
    m = DiTDH(**TINY_DITDH, mlp_ratio=2.0)
    return m.to(device).train()


def _dit_batches(device: str) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(8, 4, 4, 4, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    out = []
    for i in range(STEPS):
        rows = torch.arange(4) + (i % 2) * 4
        b = {
            "x1": x1[rows],
            "y": y[rows],
            "t": torch.rand(4, generator=g),
            "noise": torch.randn(4, 4, 4, 4, generator=g),
            "drop_mask": label_drop_mask(4, 0.25, generator=g),
        }
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def _dit_step(model: DiTDH, b: dict) -> torch.Tensor:
    return model.training_loss(b["x1"], b["y"], t=b["t"], noise=b["noise"], drop_mask=b["drop_mask"])


@pytest.mark.gpu_smoke  # gpu_suite.sh's GPU test step: cheap there (the two flow-matching kernels only)
def test_ditdh_reference_vs_fused_training(kernel_device):
    base = _tiny_dit(kernel_device)
    init = {k: v.detach().clone() for k, v in base.named_parameters()}
    batches = _dit_batches(kernel_device)
    ref_model, fused_model = copy.deepcopy(base), copy.deepcopy(base)
    ref_model.ops_backend = "reference"
    fused_model.ops_backend = "triton"
    ref = _train(ref_model, _dit_step, batches)
    fused = _train(fused_model, _dit_step, batches)
    _assert_paths(ref[2], dict.fromkeys(TRITON_OPS_DIT, "reference"))
    _assert_paths(fused[2], dict.fromkeys(TRITON_OPS_DIT, "triton"))
    _assert_trained(ref, init)
    _assert_same_run(ref, fused)


def test_convergence_check_catches_a_wrong_fused_path(kernel_device):
    """The comparison can fail: a run whose loss differs slightly (the KL weight 2e-3 instead of 1e-3)
    does not pass it."""
    base = _tiny_rectok(kernel_device)
    batches = _rectok_batches(base, kernel_device)[:6]
    ref_model, other = copy.deepcopy(base), copy.deepcopy(base)
    ref_model.ops_backend = other.ops_backend = "reference"

    def wrong_step(model, b):
        out = model(b["images"], mask=b["mask"], t=b["t"], noise=b["noise"], teacher_features=b["feats"])
        return (out.reconstruction - b["images"]).square().mean() + 2e-3 * out.kl + out.sem_loss

    ref = _train(ref_model, _rectok_step, batches)
    bad = _train(other, wrong_step, batches)
    with pytest.raises(AssertionError):
        _assert_same_run(ref, bad)
