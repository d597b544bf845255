"""Attention backends (filled in by the models work); this stub lists what is importable."""

from __future__ import annotations

import importlib.util


def available_backends() -> list[str]:
    out = ["sdpa", "math"]
    if importlib.util.find_spec("flash_attn") is not None:
        out.insert(0, "flash_attn")
    if importlib.util.find_spec("xformers") is not None:
        out.insert(0, "xformers")
    return out
