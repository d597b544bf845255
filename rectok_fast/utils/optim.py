"""AdamW parameter groups (method §3: no weight decay on norms, biases, embeddings and tokens) and the
per-step learning-rate schedules (linear warm-up + cosine; DiT's constant-then-linear)."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_KEYWORDS = (
    "pos_embed",
    "position_embedding",
    "positional_embedding",
    "mask_token",
    "mask_embedding",
    "cls_token",
    "token_embedding_table",
    "y_embedder",
    "embedding_table",
    "freqs",
    "register",
)


def is_no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights, biases (1-D tensors), embeddings and learned tokens get no weight decay."""
    if p.ndim <= 1 or name.endswith(".bias"):
        return True
    low = name.lower()
    return any(k in low for k in NO_DECAY_KEYWORDS) or any("norm" in part for part in low.split(".")[:-1])


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: ``decay`` and ``no_decay`` (names kept for logs)."""
    decay, no_decay, dn, nn_ = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_no_decay(name, p):
            no_decay.append(p)
            nn_.append(name)
        else:
            decay.append(p)
            dn.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": dn})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": nn_})
    return groups


def make_adamw(
    model: nn.Module, lr: float, betas, weight_decay: float, *, fused: bool | None = None
) -> torch.optim.AdamW:
    groups = build_param_groups(model, weight_decay)
    for g in groups:
        g.pop("names")
    dev = next((p.device for g in groups for p in g["params"]), torch.device("cpu"))
    kw = {}
    if fused is None:
        fused = dev.type == "cuda"
    if fused:
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kw)


def lr_at(
    step: int,
    *,
    peak: float,
    total: int,
    schedule: str = "cosine",
    warmup: int = 0,
    min_lr: float = 0.0,
    decay_start: int | None = None,
    decay_end: int | None = None,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    ``cosine``: ``peak·(step+1)/warmup`` during warm-up, then ``min_lr + (peak-min_lr)·½(1+cos(π·p))``
    with ``p`` the fraction of the post-warm-up steps done.  ``const_linear``: warm-up, ``peak`` until
    ``decay_start``, linear to ``min_lr`` at ``decay_end``, then ``min_lr``.  ``constant``: warm-up then ``peak``.
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "cosine":
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "const_linear":
        ds = decay_start if decay_start is not None else total
        de = decay_end if decay_end is not None else total
        if step < ds:
            return peak
        if step >= de:
            return min_lr
        return peak + (min_lr - peak) * (step - ds) / max(1, de - ds)
    if schedule == "constant":
        return peak
    raise ValueError(f"lr_at: unknown schedule {schedule!r} (cosine | const_linear | constant)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float, mults: list[float] | None = None) -> None:
    for i, g in enumerate(optimizer.param_groups):
        g["lr"] = lr * (mults[i] if mults else 1.0)
