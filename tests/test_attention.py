"""Attention backends: agreement with the math reference, head-dim padding, selection, compile."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import assert_fa_rule

import rectok_fast
from rectok_fast.nn.attention import (
    BACKENDS,
    attention,
    attention_math,
    available_backends,
    resolve_backend,
    supported_head_dim,
)


def _qkv(B, H, N, D, dtype=torch.float32, device="cpu", M=None):
    M = N if M is None else M
    q = torch.randn(B, H, N, D, dtype=dtype, device=device)
    k = torch.randn(B, H, M, D, dtype=dtype, device=device)
    v = torch.randn(B, H, M, D, dtype=dtype, device=device)
    return q, k, v


def _naive(q, k, v):
    """Plain same-dtype attention (no upcast): the 'same precision PyTorch reference' of the FA rule."""
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 7, 16), (1, 2, 13, 72), (2, 4, 33, 64)])
def test_sdpa_matches_math_fp32(shape):
    q, k, v = _qkv(*shape)
    ref = attention_math(q.double(), k.double(), v.double())
    out = attention(q, k, v, backend="sdpa")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, backend="math").double(), ref, atol=1e-5, rtol=1e-5)


def test_cross_lengths_and_noncontiguous():
    q, k, v = _qkv(2, 3, 5, 16, M=9)
    qt = torch.randn(2, 5, 3, 16).transpose(1, 2)  # non-contiguous (B, H, N, D) view
    out = attention(qt, k, v, backend="sdpa")
    torch.testing.assert_close(out, attention_math(qt, k, v), atol=1e-5, rtol=1e-5)
    assert attention(q, k, v, backend="math").shape == (2, 3, 5, 16)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("D,target", [(72, 96), (72, 80), (48, 64), (20, 24)])
def test_head_dim_padding_is_exact(backend, D, target):
    """Zero-padding q, k, v to a larger head dim with the original D^-1/2 scale changes nothing."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 3, 11, D))
    ref = attention(q, k, v, backend=backend)
    out = attention(q, k, v, backend=backend, pad_head_dim=target)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    grads_pad = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(grads_pad, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_padding_keeps_original_scale():
    """A wrong scale (of the padded dim) would be detectable: the padded result is not attention at D=96."""
    q, k, v = _qkv(1, 1, 9, 72)
    out = attention(q, k, v, backend="math", pad_head_dim=96)
    wrong = ((q @ k.transpose(-2, -1)) * 96**-0.5).softmax(-1) @ v
    assert (out - wrong).abs().max() > 1e-4
    with pytest.raises(ValueError, match="smaller than the head dim"):
        attention(q, k, v, backend="math", pad_head_dim=64)


def test_supported_head_dims():
    assert supported_head_dim("flash_attn3", 72) == 96
    assert supported_head_dim("flash_attn4", 72) == 96
    assert supported_head_dim("flash_attn3", 64) == 64
    assert supported_head_dim("flash_attn", 72) == 72
    assert supported_head_dim("sdpa_flash", 36) == 40
    assert supported_head_dim("sdpa_cudnn", 72) == 72
    assert supported_head_dim("math", 37) == 37
    assert supported_head_dim("sdpa", 37) == 37
    with pytest.raises(ValueError, match="up to 128"):
        supported_head_dim("flash_attn4", 192)


def test_selection_argument_env_and_record(monkeypatch):
    q, k, v = _qkv(1, 2, 4, 8)
    monkeypatch.delenv("RECTOK_FAST_ATTN", raising=False)
    attention(q, k, v)
    assert rectok_fast.last_backend("attention") == "sdpa"  # auto on CPU
    monkeypatch.setenv("RECTOK_FAST_ATTN", "math")
    attention(q, k, v)
    assert rectok_fast.last_backend("attention") == "math"
    attention(q, k, v, backend="sdpa")  # the argument wins over the env var
    assert rectok_fast.last_backend("attention") == "sdpa"
    monkeypatch.setenv("RECTOK_FAST_ATTN", "fastest_please")
    with pytest.raises(ValueError, match="RECTOK_FAST_ATTN"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="nope")
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        attention(q[0], k[0], v[0])


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed here")
def test_missing_package_raises_clearly():
    q, k, v = _qkv(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="not importable"):
        attention(q, k, v, backend="flash_attn")


def test_available_backends_lists_builtin():
    av = available_backends()
    assert {"sdpa", "math", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient"} <= set(av)
    assert set(av) <= set(BACKENDS)
    assert resolve_backend("auto", torch.zeros(1, 1, 1, 8)) == "sdpa"


def test_bf16_cpu_fa_rule():
    q, k, v = _qkv(2, 2, 31, 64)
    ref32 = attention_math(q, k, v)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    out = attention(qb, kb, vb, backend="sdpa")
    assert out.dtype == torch.bfloat16
    assert_fa_rule(out, _naive(qb, kb, vb), ref32)


def test_compiles_fullgraph(monkeypatch):
    monkeypatch.setenv("RECTOK_FAST_ATTN", "sdpa")
    q, k, v = _qkv(1, 2, 9, 72)
    f = torch.compile(lambda a, b, c: attention(a, b, c, pad_head_dim=80), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(q, k, v), attention_math(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.cuda_only
@pytest.mark.parametrize("D", [64, 72, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_backends_fa_rule(D, dtype):
    q, k, v = _qkv(2, 4, 257, D, device="cuda")
    ref32 = attention_math(q, k, v)
    same = _naive(*(t.to(dtype) for t in (q, k, v)))
    names = [b for b in available_backends() if b != "math"] + ["auto"]
    ran = 0
    for name in names:
        try:
            out = attention(*(t.to(dtype) for t in (q, k, v)), backend=name)
        except (RuntimeError, ValueError) as e:  # a backend without a kernel for this GPU/dtype/head dim
            if "sdpa_" in name or "flash_attn" in name:
                print(f"{name} unavailable: {e}")
                continue
            raise
        ran += 1
        assert out.shape == q.shape
        assert_fa_rule(out, same, ref32)
    assert ran >= 2


# ------------------------------------------------------------------ auto: table, traceable choice


def _attn_module():
    import sys

    return sys.modules["rectok_fast.nn.attention"]  # the package re-exports the function under this name


def test_shape_class():
    A = _attn_module()
    assert A.shape_class(torch.bfloat16, 64, 256) == "bf16-hd64-short"
    assert A.shape_class(torch.float16, 72, 513) == "fp16-hd72-long"
    assert A.shape_class(torch.float32, 64, 256) is None
    assert A.shape_class(torch.bfloat16, 65, 256) is None


@pytest.fixture
def fake_sm90(monkeypatch):
    """Pretend device 0 is an sm90 GPU for the CUDA branch of auto (no GPU is queried)."""
    A = _attn_module()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(A, "_CAPABILITY", {})
    return A


def test_auto_uses_table_then_default_order(fake_sm90, monkeypatch):
    A = fake_sm90
    monkeypatch.setattr(A, "_HAS", {"flash_attn": False, "flash_attn_interface": False, "xformers": False})
    monkeypatch.setattr(A, "_TABLE", {})
    assert A._auto_cuda(0, torch.bfloat16, 64, 256) == "sdpa"  # nothing measured, nothing installed
    monkeypatch.setattr(A, "_HAS", {"flash_attn": True, "flash_attn_interface": True, "xformers": False})
    assert A._auto_cuda(0, torch.bfloat16, 64, 256) == "flash_attn3"  # today's order on sm90
    assert A._auto_cuda(0, torch.bfloat16, 512, 256) == "sdpa"  # no FA kernel above head dim 256
    table = {"9.0": {"bf16-hd64-short": ["flash_attn4", "sdpa_cudnn", "sdpa_flash"]}}
    monkeypatch.setattr(A, "_TABLE", table)
    monkeypatch.setattr(A, "_SUBMODULES", {"flash_attn.cute": False})
    assert A._auto_cuda(0, torch.bfloat16, 64, 256) == "sdpa_cudnn"  # first runnable table entry
    assert A._auto_cuda(0, torch.bfloat16, 64, 1024) == "flash_attn3"  # other shape class: default
    assert A._auto_cuda(0, torch.float16, 64, 256) == "flash_attn3"  # the table is per dtype
    monkeypatch.setattr(A, "_TABLE", {"8.0": table["9.0"]})
    assert A._auto_cuda(0, torch.bfloat16, 64, 256) == "flash_attn3"  # the table is per capability


@pytest.mark.parametrize("dynamic", [False, True])
def test_auto_choice_traces_fullgraph(fake_sm90, monkeypatch, dynamic):
    """The CUDA branch of auto (capability, submodule look-up, table) under torch.compile(fullgraph):
    torch 2.11's dynamo refused importlib.util.find_spec there."""
    A = fake_sm90
    monkeypatch.setattr(A, "_SUBMODULES", {})
    monkeypatch.setattr(A, "_HAS", {"flash_attn": False, "flash_attn_interface": False, "xformers": False})
    # json.decoder stands in for a submodule such as flash_attn.cute: resolved by find_spec at trace time
    monkeypatch.setitem(A._MODULE, "flash_attn4", "json.decoder")
    monkeypatch.setattr(A, "_TABLE", {"9.0": {"bf16-hd64-short": ["flash_attn4", "sdpa"]}})

    def f(q):
        name = A._auto_cuda(0, q.dtype, q.shape[-1], q.shape[-2])
        return q * 2 if name == "flash_attn4" else q * 3

    g = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="eager")
    q = torch.ones(1, 2, 16, 64, dtype=torch.bfloat16)
    assert g(q).float().mean().item() == 2.0
    assert g(torch.ones(1, 2, 16, 72, dtype=torch.bfloat16)).float().mean().item() == 3.0  # no entry: sdpa
    assert A._SUBMODULES == {"json.decoder": True} and A._CAPABILITY == {0: "9.0"}


def test_committed_table_is_well_formed():
    from rectok_fast.nn.attention_table import SOURCE, TABLE

    A = _attn_module()
    for cap, entries in TABLE.items():
        assert cap.count(".") == 1 and all(p.isdigit() for p in cap.split(".")), cap
        assert cap in SOURCE, f"table entry for {cap} without its measurement's provenance"
        for cls, order in entries.items():
            assert cls.split("-")[0] in ("bf16", "fp16") and order, (cls, order)
            assert set(order) <= set(BACKENDS) - {"auto", "math"}, order
    assert set(SOURCE) <= set(TABLE)
    assert A._TABLE is TABLE
