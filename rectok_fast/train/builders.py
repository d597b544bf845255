"""The frozen teacher a tokenizer run trains against (:func:`build_teacher`).

The model builders and loaders moved to :mod:`rectok_fast.models.loading` (``build_rectok``,
``build_ditdh``, ``teacher_width``, ``load_tokenizer``, ``load_dit``) and ``write_json`` to
:mod:`rectok_fast.utils`; importing them from here still works and warns (``DeprecationWarning``).
"""

from __future__ import annotations

import torch

from .._moved import moved_names
from ..config import ModelConfig
from ..models.loading import teacher_width as _teacher_width
from ..models.teachers import load_teacher

_LOADING = ("DEFAULT_TEACHER_WIDTH", "teacher_width", "build_rectok", "build_ditdh", "load_tokenizer", "load_dit")
__getattr__ = moved_names(
    __name__, {**dict.fromkeys(_LOADING, "rectok_fast.models.loading"), "write_json": "rectok_fast.utils"}
)


def build_teacher(mc: ModelConfig, device: torch.device, image_size: int):
    """The frozen teacher named by ``mc.teacher`` (``tiny`` needs no weights; the others load from
    ``mc.teacher_path`` or their hub name, see :func:`rectok_fast.models.teachers.load_teacher`)."""
    patch = int(mc.extra.get("patch_size", 16))
    if mc.teacher == "tiny":
        return load_teacher(
            "tiny",
            device=device,
            tokenizer_patch=patch,
            width=_teacher_width(mc),
            patch_size=patch,
            max_grid=max(16, image_size // patch),
        )
    return load_teacher(mc.teacher, mc.teacher_path, device=device, tokenizer_patch=patch)
