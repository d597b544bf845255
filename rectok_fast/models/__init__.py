"""Models: the RecTok tokenizer, its teachers and the DiT^DH generator."""

from __future__ import annotations

import importlib

_LAZY = {
    "RecTok": ".rectok",
    "RECTOK_SIZES": ".rectok",
    "DiTDH": ".ditdh",
    "DITDH_SIZES": ".ditdh",
    "TinyTeacher": ".teachers",
    "load_teacher": ".teachers",
    "load_tokenizer": ".loading",
    "load_dit": ".loading",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
