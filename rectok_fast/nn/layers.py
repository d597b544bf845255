"""Transformer building blocks shared by the tokenizer and DiT^DH (method §1, §4)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .rope import apply_rope, rotate_pairs

__all__ = ["Attention", "Block", "RMSNorm", "SwiGLU", "apply_rope", "gate", "modulate", "rotate_pairs", "swiglu_hidden"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32: ``x / sqrt(mean(x²) + eps) · weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``a, b = w12(x).chunk(2)`` (first half ``a``); x (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)

    def extra_repr(self) -> str:
        return f"hidden={self.w3.in_features}"


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """``int(2/3 · mlp_ratio · dim)``: 2048 for 768, 3072 for 1152, 5461 for 2048."""
    return int(2 / 3 * mlp_ratio * dim)


class Attention(nn.Module):
    """qkv Linear (split (3, heads, head_dim)), optional per-head q/k RMSNorm, RoPE, SDPA, proj."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False, backend: str | None = None
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, N, dim); rope = (cos, sin) each (B|1, N, head_dim) or None → (B, N, dim)."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = (r.unsqueeze(1).to(q.dtype) for r in rope)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q, k, v, self.backend)
        return self.proj(o.transpose(1, 2).reshape(B, N, -1))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend or 'auto'}"


class Block(nn.Module):
    """The tokenizer's pre-norm block (method §1): ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False, backend: str | None = None
    ):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=qk_norm, backend=backend)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, N, dim); rope = (cos, sin) each (B|1, N, head_dim) -> (B, N, dim)."""
        x = x + self.attn(self.norm1(x), rope=rope)
        return x + self.mlp(self.norm2(x))


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x·(1 + scale) + shift`` (DiT^DH's; ``shift=None`` scales only).

    x (B, N, D); shift/scale (B, D), (B, 1, D) or (B, N, D).  Computed as a product then a sum (not
    one ``addcmul``), the rounding DiT^DH's golden outputs were recorded with."""
    if scale.dim() == 2:
        scale = scale.unsqueeze(1)
    x = x * (1 + scale)
    if shift is None:
        return x
    return x + (shift.unsqueeze(1) if shift.dim() == 2 else shift)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """adaLN gate ``g·x``; x (B, N, D), g (B, D) or (B, N, D)."""
    return x * (g.unsqueeze(1) if g.dim() == 2 else g)
