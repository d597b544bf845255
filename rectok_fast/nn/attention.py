"""Scaled-dot-product attention with selectable backends.

``attention(q, k, v, backend=None)`` with q, k, v of shape (B, H, N, D) returns (B, H, N, D) with
softmax scale ``D ** -0.5``, no mask, no dropout.  Backends:

* ``"flash_attn"``: the flash-attn package (FA2/FA3 ``flash_attn_func``), when importable;
* ``"xformers"``: ``xformers.ops.memory_efficient_attention``, when importable;
* ``"sdpa"``: PyTorch SDPA, letting PyTorch choose; ``"sdpa_cudnn"``, ``"sdpa_flash"``,
  ``"sdpa_efficient"``: SDPA restricted to one backend (``torch.nn.attention.sdpa_kernel``);
* ``"math"``: the explicit softmax(QKᵀ)V reference (fp32 accumulation);
* ``"auto"`` (default, or ``RECTOK_FAST_ATTN``): the fastest available for device, dtype and head dim.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash_attn", "xformers", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math")


def available_backends() -> list[str]:
    """Backends importable here (no GPU query)."""
    out = []
    if importlib.util.find_spec("flash_attn") is not None:
        out.append("flash_attn")
    if importlib.util.find_spec("xformers") is not None:
        out.append("xformers")
    out += ["sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math"]
    return out


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference: ``softmax(q kᵀ · D^-½) v`` computed in fp32, cast back to q's dtype."""
    scale = q.shape[-1] ** -0.5
    attn = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (attn.softmax(dim=-1) @ v.float()).to(q.dtype)


def _sdpa_backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]


def resolve_backend(backend: str | None, q: torch.Tensor) -> str:
    backend = backend or os.environ.get("RECTOK_FAST_ATTN", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """q, k, v: (B, H, N, D) → (B, H, N, D)."""
    name = resolve_backend(backend, q)
    if name == "math":
        return attention_math(q, k, v)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if name.startswith("sdpa_"):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_sdpa_backend_enum(name)):
            return F.scaled_dot_product_attention(q, k, v)
    if name == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if name == "xformers":
        import xformers.ops as xops

        return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    raise AssertionError(name)
