"""Training utilities: checkpointing, distributed helpers, EMA, optimizer/schedule, RNG, logging, images."""

from __future__ import annotations

import json
import os

from .checkpoint import load_checkpoint, save_checkpoint
from .ema import EMA
from .optim import build_param_groups, lr_at
from .rng import get_rng_state, set_rng_state

__all__ = [
    "EMA",
    "build_param_groups",
    "get_rng_state",
    "load_checkpoint",
    "lr_at",
    "save_checkpoint",
    "set_rng_state",
    "write_json",
]


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` as indented JSON atomically (``path.tmp`` then ``os.replace``); non-JSON numbers
    (NumPy / torch scalars) are written as floats."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(path + ".tmp", path)
