"""The one helper that sees through the wrappers a training run puts around a model."""

from __future__ import annotations

import torch.nn as nn


def unwrap(model: nn.Module, *, keep: tuple[type, ...] = ()) -> nn.Module:
    """The bare module under DDP / FSDP1 / DataParallel (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, any number of them nested.  ``keep``: wrapper types not to look
    through (the EMA keeps its shadow in ``.module`` too)."""
    while not isinstance(model, keep):
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


__all__ = ["unwrap"]
