"""A model-wide ``ops_backend`` (RecTok, DiT^DH), RecTok's z-free forward and its trusted masks.

Which path every fused op took is read from :func:`rectok_fast.last_backend`'s record after one
training step (forward + backward), cleared before it, so an op that ignored the model's backend
shows up under its own name.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_DITDH, tiny_rectok_config

import rectok_fast
from rectok_fast import _backend, _validate
from rectok_fast.config import ModelConfig
from rectok_fast.masking import Mask
from rectok_fast.models import rectok as rectok_module
from rectok_fast.models.ditdh import DiTDH, DiTDHConfig, training_loss
from rectok_fast.models.loading import build_rectok
from rectok_fast.models.rectok import RecTok, RecTokConfig

pytestmark = pytest.mark.usefixtures("one_thread")

RECTOK_OPS = ("patchify", "unpatchify", "gather_tokens", "restore_tokens", "posterior_flow", "cosine_align_loss")


def _rectok(**kw) -> RecTok:
    return RecTok(tiny_rectok_config(**kw)).train()


def _rectok_step(m: RecTok, device: str = "cpu", **kw) -> dict[str, str]:
    """One masked training step; the path each op took."""
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).to(device)
    feats = {"tiny": torch.randn(2, 16, 8, device=device)}
    mask = m.sample_mask(2, device, num_kept=10)
    _backend._LAST.clear()
    out = m(x, mask=mask, teacher_features=feats, **kw)
    (out.reconstruction.square().mean() + out.kl + out.sem_loss).backward()
    return {k: v for k, v in _backend._LAST.items() if k != "*"}


def test_rectok_ops_backend_reaches_every_op(kernel_device):
    m = _rectok().to(kernel_device)
    assert m.ops_backend == "auto" and m.config.ops_backend == "auto"
    m.ops_backend = "reference"
    paths = _rectok_step(m, kernel_device)
    assert {op: paths.get(op) for op in RECTOK_OPS} == dict.fromkeys(RECTOK_OPS, "reference")
    assert m.config.ops_backend == "reference" and "ops_backend='reference'" in repr(m)
    if kernel_device == "cpu" or rectok_fast.build_info()["cuda_extension_compiled"]:
        m.ops_backend = "triton"
        paths = _rectok_step(m, kernel_device)
        want = {op: "cpp" if op in ("patchify", "unpatchify") else "triton" for op in RECTOK_OPS}
        assert {op: paths.get(op) for op in RECTOK_OPS} == want
        # forward(flow_backend=) overrides the model's backend for the posterior/flow op only
        paths = _rectok_step(m, kernel_device, flow_backend="reference")
        assert paths["posterior_flow"] == "reference" and paths["gather_tokens"] == "triton"
    with pytest.raises(ValueError, match="ops_backend"):
        m.ops_backend = "cpp"


def test_rectok_ops_backend_as_constructor_argument_and_config_key():
    m = RecTok(tiny_rectok_config(ops_backend="reference")).train()
    assert m.ops_backend == "reference" and m.noiser.backend == "reference" and m.sem_criterion.backend == "reference"
    assert all(t.ops_backend == "reference" for t in (m.encoder, m.decoder, *m.sem_decoders.values()))
    # the YAML configs' model.extra reaches it (the trainers build models with build_rectok)
    built = build_rectok(ModelConfig(name="tiny", latent_channels=4, extra={"ops_backend": "reference"}), 32)
    assert built.ops_backend == "reference"
    with pytest.raises(ValueError, match="ops_backend"):
        RecTokConfig(ops_backend="fast")
    # a config shared by two models is not changed behind the other's back; the backend is no architecture
    cfg = tiny_rectok_config()
    a, b = RecTok(cfg), RecTok(cfg)
    a.ops_backend = "reference"
    assert b.ops_backend == "auto" and b.config.ops_backend == "auto" and a.config == b.config


def test_rectok_tokenize_sample_uses_the_backend():
    m = _rectok().eval()
    m.ops_backend = "reference"
    _backend._LAST.clear()
    m.tokenize(torch.rand(1, 3, 16, 16) * 2 - 1, sample=True)
    assert _backend._LAST["posterior_flow"] == "reference" and _backend._LAST["patchify"] == "reference"


def test_ditdh_ops_backend_drives_training_loss(kernel_device):
    kw = TINY_DITDH
    m = DiTDH(**kw, ops_backend="reference").to(kernel_device)
    assert m.ops_backend == "reference" and DiTDH(**kw).ops_backend == "auto"
    x1, y = torch.randn(2, 4, 4, 4, device=kernel_device), torch.tensor([0, 3], device=kernel_device)
    x0, t = torch.randn_like(x1), torch.rand(2, device=kernel_device)
    _backend._LAST.clear()
    ref = m.training_loss(x1, y, noise=x0, t=t, label_drop=0.0)
    assert _backend._LAST["flow_matching_xt"] == _backend._LAST["flow_matching_loss"] == "reference"
    m.ops_backend = "triton"
    fused = training_loss(m, x1, y, noise=x0, t=t, label_drop=0.0)
    assert _backend._LAST["flow_matching_xt"] == _backend._LAST["flow_matching_loss"] == "triton"
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-7)
    training_loss(m, x1, y, noise=x0, t=t, label_drop=0.0, backend="reference")  # an explicit backend wins
    assert _backend._LAST["flow_matching_loss"] == "reference"
    assert DiTDHConfig(**kw, ops_backend="reference") == DiTDHConfig(**kw)  # not part of the architecture
    with pytest.raises(ValueError, match="ops_backend"):
        m.ops_backend = "cpp"
    with pytest.raises(ValueError, match="ops_backend"):
        DiTDHConfig(**kw, ops_backend="fast")


def test_rectok_forward_does_not_compute_z_unless_needed(monkeypatch):
    """γ > 0 with a noisy semantic input uses only z_t: posterior_flow runs with return_z=False and
    ``out.z`` is None (``return_z=True`` asks for it); a clean semantic input, or γ = 0, has z."""
    calls = []
    real = rectok_fast.ops.posterior_flow

    def spy(*a, **k):
        calls.append(k.get("return_z", True))
        return real(*a, **k)

    monkeypatch.setattr(rectok_fast.ops, "posterior_flow", spy)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    B, K, C = 2, 10, 4
    noise = (torch.randn(B, K, C), torch.randn(B, K, C))
    t = torch.tensor([0.3, 0.6])
    m = _rectok()
    mask = m.sample_mask(B, num_kept=K)
    out = m(x, mask=mask, t=t, noise=noise)
    assert calls == [False] and out.z is None
    full = m(x, mask=mask, t=t, noise=noise, return_z=True)
    assert calls[-1] is True
    assert torch.equal(out.z_t, full.z_t) and torch.equal(out.reconstruction, full.reconstruction)
    moments = m.encode(x, mask.ids_keep)
    torch.testing.assert_close(full.z, moments[..., :C] + torch.exp(0.5 * moments[..., C:].clamp(-30, 20)) * noise[0])
    clean = _rectok(sem_input_type="clean")
    assert clean(x, mask=mask, t=t, noise=noise).z is not None and calls[-1] is True
    stage2 = _rectok(gamma=0.0, mask_ratio=0.0, mask_ratio_min=0.0)
    o2 = stage2(x, mask=Mask(None, None), noise=(torch.randn(B, 16, C), torch.randn(B, 16, C)))
    assert o2.z is o2.z_t  # without flow noise z is z_t
    # the gradients do not depend on it
    out.reconstruction.square().mean().backward()
    g = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m(x, mask=mask, t=t, noise=noise, return_z=True).reconstruction.square().mean().backward()
    for k, v in g.items():
        torch.testing.assert_close(dict(m.named_parameters())[k].grad, v)


def test_rectok_forward_trusts_the_mask_it_draws(monkeypatch):
    """forward(mask=None) draws a permutation (valid by construction) and skips the per-op eager index
    checks (host syncs); a mask handed in is still checked."""
    seen = []
    real = rectok_module.gather_tokens

    def spy(x, ids, *a, **k):
        seen.append(_validate.index_checks_enabled())
        return real(x, ids, *a, **k)

    monkeypatch.setattr(rectok_module, "gather_tokens", spy)
    m = _rectok()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    feats = {"tiny": torch.randn(2, 16, 8)}
    m(x, teacher_features=feats)
    assert seen and not any(seen)
    assert _validate.index_checks_enabled()  # restored after the forward
    seen.clear()
    m(x, mask=m.sample_mask(2, num_kept=10), teacher_features=feats)
    assert seen and all(seen)
    bad = m.sample_mask(2, num_kept=10)
    with pytest.raises(ValueError, match="ids_keep"):
        m(x, mask=Mask(bad.ids_keep + 100, bad.ids_restore), teacher_features=feats)
    assert rectok_fast.trusted_indices is _validate.trusted_indices
