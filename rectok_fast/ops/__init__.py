"""Fused ops: each functional validates its inputs, picks a backend and runs a registered torch op.

All take ``backend="auto" | "triton" | "reference"`` (the C++ patch ops: ``"auto" | "cpp" | "reference"``);
:func:`rectok_fast.last_backend` tells which path ran.  Importing this module registers the ops
(``torch.ops.rectok_fast.*``); it compiles nothing and does not touch the GPU.

The functionals are imported eagerly on purpose: several share their submodule's name
(``ops.posterior_flow`` is both), and a lazily imported submodule would shadow the function.
"""

from __future__ import annotations

from .._moved import moved_names
from .cosine_align import cosine_align_loss
from .distmat import distmat_align_loss
from .flow_matching import flow_matching_loss, flow_matching_noise, flow_matching_xt
from .kl import gaussian_kl, kl_align_loss
from .patchify import patchify, unpatchify
from .posterior_flow import NOISE_STREAM_VERSION, flow_noise, noise_stream_info, posterior_flow
from .tokens import gather_tokens, restore_tokens

__all__ = [
    "NOISE_STREAM_VERSION",
    "cosine_align_loss",
    "distmat_align_loss",
    "flow_matching_loss",
    "flow_matching_noise",
    "flow_matching_xt",
    "flow_noise",
    "gather_tokens",
    "gaussian_kl",
    "kl_align_loss",
    "noise_stream_info",
    "patchify",
    "posterior_flow",
    "restore_tokens",
    "unpatchify",
]

# not fused ops: the flow-time helpers live in rectok_fast.schedules
__getattr__ = moved_names(
    __name__, dict.fromkeys(("default_shift", "sample_time", "shift_time"), "rectok_fast.schedules")
)
