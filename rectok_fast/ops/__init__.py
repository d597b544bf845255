"""Fused ops: each functional validates its inputs, picks a backend and runs a registered torch op.

All take ``backend="auto" | "triton" | "reference"`` (the C++ patch ops: ``"auto" | "cpp" | "reference"``);
:func:`rectok_fast.last_backend` tells which path ran.  Submodules are imported on first use so that
``import rectok_fast`` stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "patchify": ".patchify",
    "unpatchify": ".patchify",
    "gather_tokens": ".tokens",
    "restore_tokens": ".tokens",
    "posterior_flow": ".posterior_flow",
    "flow_noise": ".posterior_flow",
    "sample_time": ".posterior_flow",
    "shift_time": ".posterior_flow",
    "default_shift": ".posterior_flow",
    "flow_matching_loss": ".flow_matching",
    "flow_matching_xt": ".flow_matching",
    "flow_matching_noise": ".flow_matching",
    "cosine_align_loss": ".cosine_align",
    "gaussian_kl": ".kl",
    "kl_align_loss": ".kl",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
