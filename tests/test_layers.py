"""Blocks: RMSNorm, SwiGLU, the two RoPE tables, Attention with RoPE, adaLN helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_file

from rectok_fast.nn.attention import attention_math
from rectok_fast.nn.layers import Attention, Block, RMSNorm, SwiGLU, gate, modulate, swiglu_hidden
from rectok_fast.nn.rope import apply_rope, eva_rope_table, rectok_rope_table, rotate_pairs, split_table


def test_rmsnorm_matches_definition():
    n = RMSNorm(24)
    with torch.no_grad():
        n.weight.copy_(torch.randn(24))
    x = torch.randn(3, 5, 24)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), want, atol=1e-6, rtol=1e-5)
    xb = x.bfloat16()
    out = n(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("dim,hidden", [(192, 512), (768, 2048), (1152, 3072), (2048, 5461)])
def test_swiglu_hidden(dim, hidden):
    assert swiglu_hidden(dim) == hidden


def test_swiglu_first_half_is_gated():
    m = SwiGLU(8, 16)
    x = torch.randn(4, 8)
    h = m.w12(x)
    a, b = h[:, :16], h[:, 16:]
    torch.testing.assert_close(m(x), m.w3(F.silu(a) * b))


def _rectok_table_spec(D, gh, gw):
    """method §1 written out independently (explicit f_j formula, float64)."""
    q = D // 4
    f = torch.tensor([7 * (7 / 7e-4) ** (-j / (q - 1)) for j in range(q)], dtype=torch.float64)
    F_ = torch.cat([f, f])
    rows = []
    for r in range(gh):
        for c in range(gw):
            u, v = r / (gh - 1), c / (gw - 1)
            ang = torch.cat([2 * math.pi * u * F_, 2 * math.pi * v * F_])
            rows.append(torch.cat([ang.cos(), ang.sin()]))
    return torch.stack(rows)


def test_rectok_rope_golden_and_spec():
    golden = torch.load(reference_file("golden_rope_vitb.pt"), weights_only=True)["rope_vitb_grid16"]
    table = rectok_rope_table(64, 16)
    assert table.shape == (256, 128)
    torch.testing.assert_close(table, golden, atol=0, rtol=0)
    torch.testing.assert_close(rectok_rope_table(48, 5, 7).double(), _rectok_table_spec(48, 5, 7), atol=2e-5, rtol=0)
    special = rectok_rope_table(16, 3, num_special=2)
    assert special.shape == (11, 32)
    torch.testing.assert_close(special[:2], torch.cat([torch.ones(2, 16), torch.zeros(2, 16)], -1))
    with pytest.raises(ValueError, match="multiple of 4"):
        rectok_rope_table(18, 4)


def test_eva_rope_spec():
    D, g = 72, 5
    cos, sin = eva_rope_table(D, g)
    h = D // 2
    omega = [10000 ** (-2 * k / h) for k in range(h // 2)]
    for r, c in [(0, 0), (1, 3), (4, 2)]:
        row = [r * w for w in omega for _ in (0, 1)] + [c * w for w in omega for _ in (0, 1)]
        ang = torch.tensor(row, dtype=torch.float64)
        torch.testing.assert_close(cos[r * g + c].double(), ang.cos(), atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[r * g + c].double(), ang.sin(), atol=1e-6, rtol=0)


def test_rotate_pairs_and_apply():
    x = torch.arange(6.0)
    torch.testing.assert_close(rotate_pairs(x), torch.tensor([-1.0, 0, -3, 2, -5, 4]))
    table = rectok_rope_table(8, 3)
    cos, sin = split_table(table)
    x = torch.randn(2, 1, 9, 8)
    out = apply_rope(x, cos, sin)
    # method §1: rot acts on adjacent pairs even though a pair's two entries carry different angles
    want = x * cos + torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2) * sin
    torch.testing.assert_close(out, want)


def test_attention_module_matches_manual():
    torch.manual_seed(1)
    m = Attention(32, 4, qkv_bias=True, qk_norm=False, backend="sdpa")
    x = torch.randn(2, 9, 32)
    cos, sin = split_table(rectok_rope_table(8, 3))
    out = m(x, rope=(cos.unsqueeze(0), sin.unsqueeze(0)))
    qkv = m.qkv(x).reshape(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    want = m.proj(attention_math(q, k, v).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, 4)
    mq = Attention(32, 4, qk_norm=True)
    assert isinstance(mq.q_norm, RMSNorm) and mq(x).shape == x.shape


def test_block_residual_structure_and_compile():
    b = Block(32, 4)
    x = torch.randn(2, 9, 32)
    cos, sin = split_table(rectok_rope_table(8, 3))
    rope = (cos.unsqueeze(0), sin.unsqueeze(0))
    h = x + b.attn(b.norm1(x), rope=rope)
    want = h + b.mlp(b.norm2(h))
    torch.testing.assert_close(b(x, rope), want)
    cb = torch.compile(b, fullgraph=True, backend="eager")
    torch.testing.assert_close(cb(x, rope), want, atol=1e-5, rtol=1e-5)


def test_modulate_gate():
    x = torch.randn(2, 5, 6)
    shift, scale, g = torch.randn(3, 2, 6).unbind(0)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(gate(x, g), x * g[:, None])
    tok = torch.randn(2, 5, 6)
    torch.testing.assert_close(modulate(x, tok, tok), x * (1 + tok) + tok)
    torch.testing.assert_close(modulate(x, None, scale), x * (1 + scale[:, None]), rtol=0, atol=0)  # DiT^DH: no shift
    assert modulate is __import__("rectok_fast.models.ditdh", fromlist=["modulate"]).modulate  # one modulate
