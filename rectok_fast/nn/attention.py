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
* ``"auto"`` (default; or set ``RECTOK_FAST_ATTN``): on CUDA in fp16/bf16 the first runnable backend
  of the measured preference order in :mod:`rectok_fast.nn.attention_table` for this GPU's compute
  capability and the shape class (dtype, head dim, N <= 512 or longer; :func:`shape_class`); where the
  table has no entry, the first importable of FA3 (sm90), FA2, xformers, then SDPA.  Everywhere else
  SDPA.  (PyTorch's own SDPA order never picks cuDNN; the table can.)  The table is generated from
  ``benchmarks/bench_attention.py`` measurements, never typed by hand.  The choice is made without
  host work inside traced code: package presence is looked up once at import, submodules and the
  device capability once per process through constant functions, so ``torch.compile(fullgraph=True)``
  traces ``auto``.

Head-dim padding: a backend that only has kernels for some head dims (FA3/FA4 tile sizes, the
multiple-of-8 rule of the fused SDPA kernels) gets q, k, v zero-padded to the next supported size
inside the op, with the softmax scale of the original head dim; the padded output columns are
dropped.  Zero columns add nothing to ``q·k`` and produce zero output columns, so the result is
exactly the unpadded attention (``tests/test_attention.py`` checks this).  Head dim 72 (DiT-XL)
therefore never falls back to a slow path.  ``pad_head_dim=`` forces a padded size on any backend.

The chosen backend is recorded: ``rectok_fast.last_backend("attention")``.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from .._backend import record
from .attention_table import TABLE as _TABLE

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


# Which optional packages exist is looked up once, here, without importing them (``find_spec`` of a
# top-level name reads the import path only; nothing touches the GPU).  Dynamo cannot trace
# ``importlib`` (torch 2.11 refuses ``find_spec`` even behind ``functools.cache``), so traced code
# only reads this dict.  Submodules (``flash_attn.cute``) need their parent imported to be found:
# :func:`_submodule_importable` resolves them on first use, outside the traced graph.
_TOP_LEVEL = ("flash_attn", "flash_attn_interface", "xformers")


def _find_top_level(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


_HAS: dict[str, bool] = {name: _find_top_level(name) for name in _TOP_LEVEL}
_SUBMODULES: dict[str, bool] = {}
_CAPABILITY: dict[int, str] = {}


@torch.compiler.assume_constant_result
def _submodule_importable(module: str) -> bool:
    """Whether the dotted ``module`` is importable (imports its parent package once; cached).

    Marked constant for dynamo: under ``torch.compile`` it runs in Python while tracing, never in
    the graph."""
    if module not in _SUBMODULES:
        parent = module.split(".")[0]
        ok = _HAS.get(parent, True)
        if ok:
            try:
                ok = importlib.util.find_spec(module) is not None
            except Exception:  # the parent fails to import (a broken install counts as absent)
                ok = False
        _SUBMODULES[module] = ok
    return _SUBMODULES[module]


def _importable(module: str) -> bool:
    return _HAS[module] if module in _HAS else _submodule_importable(module)


@torch.compiler.assume_constant_result
def _capability(index: int) -> str:
    """``"major.minor"`` of CUDA device ``index``, queried once per device (outside traced code)."""
    if index not in _CAPABILITY:
        major, minor = torch.cuda.get_device_capability(None if index < 0 else index)
        _CAPABILITY[index] = f"{major}.{minor}"
    return _CAPABILITY[index]


def available_backends() -> list[str]:
    """Backends whose package is importable here (no GPU query; may import ``flash_attn`` to look
    for ``flash_attn.cute``)."""
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


_MODULE = {
    "flash_attn": "flash_attn",
    "flash_attn3": "flash_attn_interface",
    "flash_attn4": "flash_attn.cute",
    "xformers": "xformers",
}
# head dims and sequence-length bucket edge of the auto table's shape classes
_CLASS_HEAD_DIMS = (32, 64, 72, 80, 96, 128, 192, 256)
_SHORT_SEQ = 512


def shape_class(dtype: torch.dtype, head_dim, seq_len) -> str | None:
    """The auto table's key for a shape: ``"bf16-hd64-short"`` (``short``: N <= 512, else ``long``);
    None for dtypes other than bf16/fp16 and head dims outside :data:`_CLASS_HEAD_DIMS`.

    Written with comparisons only, so that symbolic sizes under ``torch.compile`` trace (as guards)."""
    if dtype == torch.bfloat16:
        dt = "bf16"
    elif dtype == torch.float16:
        dt = "fp16"
    else:
        return None
    for hd in _CLASS_HEAD_DIMS:
        if head_dim == hd:
            break
    else:
        return None
    return dt + "-hd" + str(hd) + "-" + ("short" if seq_len <= _SHORT_SEQ else "long")


def _runnable(name: str, head_dim) -> bool:
    module = _MODULE.get(name)
    if module is not None and not _importable(module):
        return False
    if name in _HEAD_DIMS and head_dim > _HEAD_DIMS[name][1]:
        return False
    return True


def _default_order(capability: str) -> tuple[str, ...]:
    """The order ``auto`` used before any measurement (FA3 on sm90, FA2, xformers, SDPA)."""
    return (("flash_attn3",) if capability.startswith("9.") else ()) + ("flash_attn", "xformers", "sdpa")


def _auto(q: torch.Tensor) -> str:
    """``auto``: SDPA off CUDA or outside fp16/bf16; on CUDA the first runnable backend of the
    measured table entry for (GPU capability, :func:`shape_class`), else of :func:`_default_order`.

    Everything here traces under ``torch.compile``: the capability and submodule look-ups are
    constant functions (run while tracing), the rest reads module-level dicts."""
    if not q.is_cuda or q.dtype not in _HALF:
        return "sdpa"
    index = q.device.index
    return _auto_cuda(-1 if index is None else index, q.dtype, q.shape[-1], q.shape[-2])


def _auto_cuda(index: int, dtype: torch.dtype, head_dim, seq_len) -> str:
    cap = _capability(index)
    order = _TABLE.get(cap, {}).get(shape_class(dtype, head_dim, seq_len) or "") or _default_order(cap)
    for name in order:
        if _runnable(name, head_dim):
            return name
    return "sdpa"


def resolve_backend(backend: str | None, q: torch.Tensor) -> str:
    """The backend that ``attention(q, ..., backend)`` runs on (``RECTOK_FAST_ATTN`` when None)."""
    backend = backend or os.environ.get(ENV_VAR) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS} (argument or ${ENV_VAR}), got {backend!r}")
    if backend == "auto":
        return _auto(q)
    if backend in _MODULE:
        module = _MODULE[backend]
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
