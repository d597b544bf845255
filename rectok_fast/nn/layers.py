"""Transformer building blocks shared by the tokenizer and DiT^DH (SPEC §1, §4)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32: ``x / sqrt(mean(x²) + eps) · weight``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """``w3(silu(a) * b)`` with ``a, b = w12(x).chunk(2)`` (first half ``a``)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """``int(2/3 · mlp_ratio · dim)``: 2048 for 768, 3072 for 1152, 5461 for 2048."""
    return int(2 / 3 * mlp_ratio * dim)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Adjacent-pair rotation ``(x0, x1) -> (-x1, x0)`` over the last dim."""
    x = x.unflatten(-1, (-1, 2))
    x0, x1 = x.unbind(-1)
    return torch.stack((-x1, x0), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rot(x)·sin``; x (B, H, N, D), cos/sin broadcastable to it (e.g. (B|1, 1, N, D))."""
    return x * cos + rotate_pairs(x) * sin


class Attention(nn.Module):
    """qkv Linear (split (3, heads, head_dim)), optional per-head q/k RMSNorm, RoPE, SDPA, proj."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False, backend: str | None = None):
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
