"""rectok_fast: fused kernels, models and pipelines for RecTok tokenizers and DiT^DH.

Importing this package compiles nothing, queries no GPU and downloads nothing.
"""

from __future__ import annotations

from ._backend import last_backend
from ._extension import build_config, extension_error, load_extension
from ._validate import trusted_indices

__version__ = "0.1.0"


def build_info() -> dict:
    """What was built and what can run here (used by ``python -m rectok_fast.env`` and bug reports)."""
    import torch

    from ._backend import triton_interpret

    cfg = build_config()
    error = extension_error()
    ext = None if error is not None else load_extension()
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    from .nn.attention import available_backends

    info = {
        "version": __version__,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton_version": triton_version,
        "triton_interpret": triton_interpret(),
        "cpu_extension": ext is not None,
        "cuda_extension_compiled": bool(ext is not None and cfg.get("cuda_extension_compiled", False)),
        "extension_error": error,
        "cuda_available": torch.cuda.is_available(),
        "attention_backends": available_backends(),
    }
    info.update({k: v for k, v in cfg.items() if k not in info})
    return info


__all__ = ["__version__", "build_info", "extension_error", "last_backend", "load_extension", "trusted_indices"]
