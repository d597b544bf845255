"""Pure-PyTorch twins of every fused op: the semantics, the test oracle, the eager baseline.

Each function computes exactly what SPEC.md states, in the obvious way; ``upcast=True`` computes in
fp32 (or keeps fp64) and casts the result back, which is what the tests compare kernels against.
"""

from rectok_fast._moved import moved_names

from .cosine_align import cosine_align_loss
from .distmat import distmat_align_loss
from .flow_matching import flow_matching_loss, flow_matching_xt
from .kl import gaussian_kl, kl_align_loss
from .patchify import patchify, unpatchify
from .posterior_flow import posterior_flow
from .tokens import gather_tokens, restore_tokens

__all__ = [
    "cosine_align_loss",
    "distmat_align_loss",
    "flow_matching_loss",
    "flow_matching_xt",
    "gather_tokens",
    "gaussian_kl",
    "kl_align_loss",
    "patchify",
    "posterior_flow",
    "restore_tokens",
    "unpatchify",
]

# moved to rectok_fast.schedules (not an op; the reference holds oracles only)
__getattr__ = moved_names(__name__, {"sample_time": "rectok_fast.schedules"})
