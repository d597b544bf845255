"""nn.Modules: transformer blocks (attention backends, RMSNorm, SwiGLU, RoPE) and drop-in fused modules."""

from ..masking import Mask, random_masking
from .adaptive import adaptive_weight
from .align import DistMatAlignLoss
from .attention import attention, available_backends, supported_head_dim
from .fused import (
    CosineAlignLoss,
    FlowMatchingLoss,
    FlowNoiser,
    FlowNoiserOutput,
    KLAlignLoss,
    MaskTokenRestore,
    TokenGather,
)
from .layers import Attention, Block, RMSNorm, SwiGLU, gate, modulate, swiglu_hidden
from .posterior import GaussianPosterior, PosteriorOutput
from .rope import apply_rope, eva_rope_table, rectok_rope_table, rotate_pairs, split_table

__all__ = [
    "Attention",
    "Block",
    "CosineAlignLoss",
    "DistMatAlignLoss",
    "FlowMatchingLoss",
    "FlowNoiser",
    "FlowNoiserOutput",
    "GaussianPosterior",
    "KLAlignLoss",
    "Mask",
    "MaskTokenRestore",
    "PosteriorOutput",
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
    "random_masking",
    "rectok_rope_table",
    "split_table",
    "supported_head_dim",
    "rotate_pairs",
    "swiglu_hidden",
]
