"""Scaled-dot-product attention with selectable backends.

``attention(q, k, v, backend=None)`` with q, k, v of shape (B, H, N, D) returns (B, H, N, D) with
softmax scale ``D ** -0.5`` (of the *given* head dim), no mask, no dropout.  Backends:

* ``"flash_attn"``: FlashAttention-2 (``flash_attn.flash_attn_func``), when importable;
* ``"flash_attn3"``: FlashAttention-3 (Hopper, ``flash_attn_interface.flash_attn_func``), when importable;
* ``"flash_attn4"``: FlashAttention-4 (CuTe DSL, ``flash_attn.cute.flash_attn_func``), when importable;
* ``"xformers"``: ``xformers.ops.memory_efficient_attention``, when importable;
* ``"sdpa"``: PyTorch SDPA, letting PyTorch choose; ``"sdpa_cudnn"``, ``"sdpa_flash"``,
  ``"sdpa_efficient"``: SDPA restricted to that one backend (``torch.nn.attention.sdpa_kernel``);
* ``"math"``: the explicit ``softmax(q kᵀ·scale) v`` reference, accumulated in fp32;
* ``"auto"`` (default; or set ``RECTOK_FAST_ATTN``): on CUDA in fp16/bf16 the first importable of
  FA3 (sm90), FA2, xformers, then SDPA; everywhere else SDPA.

Head-dim padding: a backend that only has kernels for some head dims (FA3/FA4 tile sizes, the
multiple-of-8 rule of the fused SDPA kernels) gets q, k, v zero-padded to the next supported size
inside the op, with the softmax scale of the original head dim; the padded output columns are
dropped.  Zero columns add nothing to ``q·k`` and produce zero output columns, so the result is
exactly the unpadded attention (``tests/test_attention.py`` checks this).  Head dim 72 (DiT-XL)
therefore never falls back to a slow path.  ``pad_head_dim=`` forces a padded size on any backend.

The chosen backend is recorded: ``rectok_fast.last_backend("attention")``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from .._backend import record

BACKENDS = (
    "auto",
    "flash_attn",
    "flash_attn3",
    "flash_attn4",
    "xformers",
    "sdpa",
    "sdpa_cudnn",
    "sdpa_flash",
    "sdpa_efficient",
    "math",
)
ENV_VAR = "RECTOK_FAST_ATTN"

# Head dims each backend has kernels for: a tuple of sizes (pad to the next one) or an int m
# (pad to a multiple of m); the last entry/limit is the largest supported head dim.
_HEAD_DIMS: dict[str, tuple[tuple[int, ...] | int, int]] = {
    "flash_attn": (8, 256),
    "flash_attn3": ((64, 96, 128, 192, 256), 256),
    "flash_attn4": ((64, 96, 128), 128),
    "xformers": (8, 256),
    "sdpa_flash": (8, 256),
    "sdpa_cudnn": (8, 128),
    "sdpa_efficient": (8, 1 << 16),
}
_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing
        return False


def available_backends() -> list[str]:
    """Backends whose package is importable here (no GPU query, nothing imported)."""
    out = []
    if _importable("flash_attn"):
        out.append("flash_attn")
    if _importable("flash_attn_interface"):
        out.append("flash_attn3")
    if _importable("flash_attn.cute"):
        out.append("flash_attn4")
    if _importable("xformers"):
        out.append("xformers")
    out += ["sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math"]
    return out


def supported_head_dim(backend: str, head_dim: int) -> int:
    """The head dim ``backend`` runs ``head_dim`` at (>= head_dim); raises when it has no kernel."""
    if backend not in _HEAD_DIMS:
        return head_dim
    sizes, limit = _HEAD_DIMS[backend]
    if head_dim > limit:
        raise ValueError(f"attention: backend {backend!r} supports head dims up to {limit}, got {head_dim}")
    if isinstance(sizes, int):
        return -(-head_dim // sizes) * sizes
    return next(s for s in sizes if s >= head_dim)


def _auto(q: torch.Tensor) -> str:
    if not q.is_cuda or q.dtype not in _HALF:
        return "sdpa"
    D = q.shape[-1]
    if D <= 256 and _importable("flash_attn_interface") and torch.cuda.get_device_capability(q.device)[0] == 9:
        return "flash_attn3"
    if D <= 256 and _importable("flash_attn"):
        return "flash_attn"
    if _importable("xformers"):
        return "xformers"
    return "sdpa"


def resolve_backend(backend: str | None, q: torch.Tensor) -> str:
    """The backend that ``attention(q, ..., backend)`` runs on (``RECTOK_FAST_ATTN`` when None)."""
    backend = backend or os.environ.get(ENV_VAR) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS} (argument or ${ENV_VAR}), got {backend!r}")
    if backend == "auto":
        return _auto(q)
    if backend in ("flash_attn", "flash_attn3", "flash_attn4", "xformers"):
        module = {
            "flash_attn": "flash_attn",
            "flash_attn3": "flash_attn_interface",
            "flash_attn4": "flash_attn.cute",
            "xformers": "xformers",
        }[backend]
        if not _importable(module):
            raise RuntimeError(
                f"attention: backend {backend!r} needs the `{module}` package, which is not importable; "
                "install it or use backend='sdpa' / 'auto'"
            )
        if not q.is_cuda or q.dtype not in _HALF:
            raise ValueError(f"attention: backend {backend!r} needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
    return backend


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The reference: ``softmax(q kᵀ · scale) v`` (scale ``D^-½`` by default) in fp32, cast to q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q.float() @ k.float().transpose(-2, -1)) * scale
    return (attn.softmax(dim=-1) @ v.float()).to(q.dtype)


def _sdpa_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _run(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k, v (B, H, N, D) with D already supported by ``name`` -> (B, H, N, D)."""
    if name == "math":
        return attention_math(q, k, v, scale)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if name.startswith("sdpa_"):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_sdpa_enum(name)):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    # the packages below take (B, N, H, D)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if name == "flash_attn":
        from flash_attn import flash_attn_func

        out = flash_attn_func(qt, kt, vt, softmax_scale=scale)
    elif name == "flash_attn3":
        from flash_attn_interface import flash_attn_func

        out = _first(flash_attn_func(qt, kt, vt, softmax_scale=scale))
    elif name == "flash_attn4":
        from flash_attn.cute import flash_attn_func

        out = _first(flash_attn_func(qt, kt, vt, softmax_scale=scale))
    elif name == "xformers":
        import xformers.ops as xops

        out = xops.memory_efficient_attention(qt, kt, vt, scale=scale)
    else:  # pragma: no cover - resolve_backend rejects unknown names
        raise AssertionError(name)
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str | None = None,
    *,
    pad_head_dim: int | None = None,
) -> torch.Tensor:
    """Multi-head softmax attention, no mask, no dropout.

    Args:
        q, k, v: (B, H, N, D) (k, v may have another sequence length M).
        backend: see the module docstring; None reads ``RECTOK_FAST_ATTN`` (default ``"auto"``).
        pad_head_dim: run the kernel at this (larger) head dim by zero-padding q, k, v; by default
            the backend's next supported head dim.  The softmax scale stays ``D^-½`` of the input.

    Returns:
        (B, H, N, D), dtype of q.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention: q, k, v must be (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    name = resolve_backend(backend, q)
    record("attention", name)
    D = q.shape[-1]
    scale = D**-0.5
    target = supported_head_dim(name, D) if pad_head_dim is None else pad_head_dim
    if target < D:
        raise ValueError(f"attention: pad_head_dim={target} is smaller than the head dim {D}")
    if target == D:
        return _run(name, q, k, v, scale)
    pad = (0, target - D)
    out = _run(name, F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), scale)
    return out[..., :D]
