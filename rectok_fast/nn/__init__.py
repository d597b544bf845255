"""nn.Modules: transformer blocks (attention backends, RMSNorm, SwiGLU, RoPE) and drop-in fused modules."""

from .attention import attention, available_backends
from .fused import CosineAlignLoss, FlowMatchingLoss, FlowNoiser, KLAlignLoss, MaskTokenRestore, TokenGather
from .layers import Attention, RMSNorm, SwiGLU, apply_rope, rotate_pairs, swiglu_hidden

__all__ = [
    "Attention",
    "CosineAlignLoss",
    "FlowMatchingLoss",
    "FlowNoiser",
    "KLAlignLoss",
    "MaskTokenRestore",
    "RMSNorm",
    "SwiGLU",
    "TokenGather",
    "apply_rope",
    "attention",
    "available_backends",
    "rotate_pairs",
    "swiglu_hidden",
]
