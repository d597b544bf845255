"""rectok_fast: fused kernels, models and pipelines for RecTok tokenizers and DiT^DH.

Importing this package compiles nothing, queries no GPU and downloads nothing.
"""

from __future__ import annotations

import importlib
import json
import os

from ._backend import last_backend

__version__ = "0.1.0"

_EXT = None
_EXT_ERROR: str | None = None


def load_extension():
    """Import ``rectok_fast._C`` (registers the ``torch.ops.rectok_fast`` C++ ops) once; None if absent."""
    global _EXT, _EXT_ERROR
    if _EXT is None and _EXT_ERROR is None:
        try:
            _EXT = importlib.import_module("rectok_fast._C")
        except ImportError as e:  # not built (e.g. running from a source tree without install)
            _EXT_ERROR = str(e)
    return _EXT


def extension_error() -> str | None:
    load_extension()
    return _EXT_ERROR


def build_info() -> dict:
    """What was built and what can run here (used by ``python -m rectok_fast.env`` and bug reports)."""
    import torch

    from ._backend import triton_interpret

    cfg_path = os.path.join(os.path.dirname(__file__), "_build_config.json")
    cfg = {}
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
    ext = load_extension()
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
        "extension_error": _EXT_ERROR,
        "cuda_available": torch.cuda.is_available(),
        "attention_backends": available_backends(),
    }
    info.update({k: v for k, v in cfg.items() if k not in info})
    return info


__all__ = ["__version__", "build_info", "last_backend", "load_extension"]
