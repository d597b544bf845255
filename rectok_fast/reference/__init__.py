"""Pure-PyTorch twins of every fused op: the semantics, the test oracle, the eager baseline.

Each function computes exactly what docs/method.md states, in the obvious way.  Every numeric reference
takes ``upcast``: ``True`` computes in fp32 (fp64 stays fp64, :mod:`._upcast`) and returns losses in
fp32 (fp64 for fp64 inputs) and tensors in the input dtype; that is what the tests compare kernels
against.  The defaults are each op's historical behaviour (the losses upcast, the tensor-valued
ops do not).  The pure data-movement ops (``patchify``, ``unpatchify``) are exact in any dtype and
take no ``upcast``.  Nothing here imports :mod:`rectok_fast.ops`, :mod:`rectok_fast.nn` or the models.
"""

from .._moved import moved_names
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
