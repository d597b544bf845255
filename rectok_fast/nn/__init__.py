"""nn.Modules: transformer blocks (attention backends, RMSNorm, SwiGLU, RoPE) and drop-in fused modules."""

from .adaptive import adaptive_weight
from .align import DistMatAlignLoss
from .attention import attention, available_backends, supported_head_dim
from .fused import CosineAlignLoss, FlowMatchingLoss, FlowNoiser, KLAlignLoss, MaskTokenRestore, TokenGather
from .layers import Attention, Block, RMSNorm, SwiGLU, gate, modulate, swiglu_hidden
from .rope import apply_rope, eva_rope_table, rectok_rope_table, rotate_pairs, split_table

__all__ = [
    "Attention",
    "Block",
    "CosineAlignLoss",
    "DistMatAlignLoss",
    "FlowMatchingLoss",
    "FlowNoiser",
    "KLAlignLoss",
    "MaskTokenRestore",
    "RMSNorm",
    "SwiGLU",
    "TokenGather",
    "adaptive_weight",
    "apply_rope",
    "attention",
    "available_backends",
    "eva_rope_table",
    "gate",
    "modulate",
    "rectok_rope_table",
    "split_table",
    "supported_head_dim",
    "rotate_pairs",
    "swiglu_hidden",
]
