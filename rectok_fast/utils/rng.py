"""Capture and restore every RNG a training step touches (bit-exact resume)."""

from __future__ import annotations

import random

import numpy as np
import torch


def numpy_state_to_plain(state: tuple) -> dict:
    """``np.random.get_state()`` (legacy tuple with an ndarray) as tensors and numbers, which
    ``torch.load(weights_only=True)`` reads without any extra global."""
    name, keys, pos, has_gauss, cached_gauss = state
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),  # uint32 values fit in int64
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gauss": float(cached_gauss),
    }


def numpy_state_from_plain(state: dict | tuple) -> tuple:
    """Inverse of :func:`numpy_state_to_plain`; a legacy tuple (older checkpoints) passes through."""
    if not isinstance(state, dict):
        return tuple(state)
    keys = state["keys"]
    keys = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    return (
        state["bit_generator"],
        keys.astype(np.uint32),
        int(state["pos"]),
        int(state["has_gauss"]),
        float(state["cached_gauss"]),
    )


def get_rng_state(extra_generators: dict[str, torch.Generator] | None = None) -> dict:
    """Python, NumPy, torch CPU and (when initialised) CUDA states, plus named ``torch.Generator`` s.

    Only tensors, numbers, strings and plain containers (the NumPy state through
    :func:`numpy_state_to_plain`), so a checkpoint holding it loads with ``weights_only=True``."""
    state = {
        "python": random.getstate(),
        "numpy": numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "generators": {k: g.get_state() for k, g in (extra_generators or {}).items()},
    }
    return state


def set_rng_state(state: dict, extra_generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`get_rng_state` (generators are restored in place by name)."""
    random.setstate(_python_state(state["python"]))
    np.random.set_state(numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded with map_location=cuda moved it
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for k, g in (extra_generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k].cpu())


def _python_state(s) -> tuple:
    """``random.getstate()`` as saved (a tuple; lists where a serializer turned tuples into lists)."""
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
