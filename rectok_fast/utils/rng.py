"""Capture and restore every RNG a training step touches (bit-exact resume)."""

from __future__ import annotations

import random

import numpy as np
import torch


def get_rng_state(extra_generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python, NumPy, torch CPU and (when initialised) CUDA states, plus named ``torch.Generator`` s."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "generators": {k: g.get_state() for k, g in (extra_generators or {}).items()},
    }
    return state


def set_rng_state(state: dict, extra_generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`get_rng_state` (generators are restored in place by name)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (extra_generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
