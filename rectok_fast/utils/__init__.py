"""Training utilities: checkpointing, distributed helpers, EMA, optimizer/schedule, RNG, logging, images."""

from .checkpoint import load_checkpoint, save_checkpoint
from .ema import EMA
from .optim import build_param_groups, lr_at
from .rng import get_rng_state, set_rng_state

__all__ = ["EMA", "build_param_groups", "get_rng_state", "load_checkpoint", "lr_at", "save_checkpoint", "set_rng_state"]
