"""Exponential moving average of a model's parameters and buffers (fp32 shadow copy)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .modules import unwrap


class EMA(nn.Module):
    """``shadow = decay·shadow + (1 - decay)·param`` after every optimizer step.

    The shadow is a full copy of the module (``self.module``), so it can be evaluated, saved with
    ``state_dict()`` and exported directly.  Buffers (e.g. BatchNorm statistics, latent stats) are copied.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.decay = float(decay)
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        src = _unwrap(model)
        ema_p = [p for p in self.module.parameters()]
        src_p = [p for p in src.parameters()]
        float_pairs = [(e, s) for e, s in zip(ema_p, src_p) if e.dtype.is_floating_point]
        if float_pairs:
            e, s = zip(*float_pairs)
            # FSDP2 parameters are DTensors: gather them (the shadow keeps full tensors)
            s = [x.full_tensor() if hasattr(x, "full_tensor") else x for x in s]
            torch._foreach_lerp_(list(e), [x.detach().to(e[0].dtype) for x in s], 1.0 - d)
        for eb, sb in zip(self.module.buffers(), src.buffers()):
            eb.copy_(sb)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


def _unwrap(model: nn.Module) -> nn.Module:
    """:func:`rectok_fast.utils.modules.unwrap` that stops at an :class:`EMA` (whose ``.module`` is its shadow)."""
    return unwrap(model, keep=(EMA,))
