"""DiT^DH: a diffusion transformer with a wide DDT head over RecTok latents (method §4).

The module tree and parameter names follow the released checkpoints exactly (``blocks.i`` holds the
``depth[0]`` encoder blocks of width ``hidden_size[0]`` followed by the ``depth[1]`` head blocks of
width ``hidden_size[1]``; ``enc_feat_rope`` / ``dec_feat_rope`` are the stored EVA RoPE tables), so
:meth:`DiTDH.from_official` loads a released ``.pth`` unchanged and infers the whole configuration
from the tensor shapes.

Time convention: ``t = 1`` is the data end, ``t = 0`` pure noise (the tokenizer's is the opposite;
:mod:`rectok_fast.schedules` sets the two side by side); ``forward(x, t, y)`` returns the velocity
``dx/dt`` (the flow-matching target ``x1 - x0``).

:func:`training_loss` is the flow-matching training objective (shifted time sampling with
:func:`~rectok_fast.schedules.training_time`, label drop-out to the null class with
:func:`drop_labels`, fused ``x_t`` and loss from :mod:`rectok_fast.ops`); the DiT trainer calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from rectok_fast._backend import BACKENDS_TRITON, takes_fused_path
from rectok_fast._validate import check_tensor
from rectok_fast.nn.layers import Attention, RMSNorm, SwiGLU, modulate, swiglu_hidden
from rectok_fast.nn.rope import eva_rope_table
from rectok_fast.ops.flow_matching import flow_matching_loss, flow_matching_xt
from rectok_fast.schedules import default_shift as _default_shift
from rectok_fast.schedules import training_time  # re-exported: part of the training objective below
from rectok_fast.utils.checkpoint import save_export

__all__ = [
    "DITDH_SIZES",
    "DiTDH",
    "DiTDHBlock",
    "DiTDHConfig",
    "DiTRoPE",
    "FinalLayer",
    "LabelEmbedder",
    "TimestepEmbedder",
    "infer_ditdh_config",
    "label_drop_mask",
    "sincos_pos_embed",
    "training_loss",
]

# Paper sizes (method §4): (encoder width, head width), (encoder depth, head depth), (encoder heads, head heads).
DITDH_SIZES: dict[str, dict] = {
    "S": {"hidden_size": (384, 2048), "depth": (12, 2), "num_heads": (6, 16)},
    "B": {"hidden_size": (768, 2048), "depth": (12, 2), "num_heads": (12, 16)},
    "L": {"hidden_size": (1024, 2048), "depth": (24, 2), "num_heads": (16, 16)},
    "XL": {"hidden_size": (1152, 2048), "depth": (28, 2), "num_heads": (16, 16)},
}


@dataclass
class DiTDHConfig:
    """Everything that determines the architecture (and nothing about training)."""

    in_channels: int = 128  # latent channels C
    input_size: int = 16  # latent grid side g (the model sees (B, C, g, g))
    patch_size: int = 1
    hidden_size: tuple[int, int] = (1152, 2048)
    depth: tuple[int, int] = (28, 2)
    num_heads: tuple[int, int] = (16, 16)
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    qk_norm: bool = False
    wo_shift: bool = False  # adaLN without the shift terms (4 instead of 6 modulation chunks)
    use_rope: bool = True
    use_pos_embed: bool = True
    attn_backend: str | None = field(default=None, compare=False)  # see rectok_fast.nn.attention
    # backend of the fused ops of the training objective (DiTDH.ops_backend); a runtime choice
    ops_backend: str = field(default="auto", compare=False)

    def __post_init__(self):
        if self.ops_backend not in BACKENDS_TRITON:
            raise ValueError(f"DiTDHConfig: `ops_backend` must be one of {BACKENDS_TRITON}, got {self.ops_backend!r}")
        self.hidden_size = tuple(int(v) for v in self.hidden_size)
        self.depth = tuple(int(v) for v in self.depth)
        self.num_heads = tuple(int(v) for v in self.num_heads)
        for name in ("hidden_size", "depth", "num_heads"):
            if len(getattr(self, name)) != 2:
                raise ValueError(
                    f"DiTDHConfig: `{name}` must have two entries (encoder, head), got {getattr(self, name)}"
                )
        for w, h, which in zip(self.hidden_size, self.num_heads, ("encoder", "head")):
            if w % h:
                raise ValueError(f"DiTDHConfig: {which} width {w} is not divisible by {h} heads")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"DiTDHConfig: input_size {self.input_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def grid(self) -> int:
        """Token grid side ``input_size / patch_size``."""
        return self.input_size // self.patch_size

    @property
    def head_dims(self) -> tuple[int, int]:
        return tuple(w // h for w, h in zip(self.hidden_size, self.num_heads))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(hidden_size=list(self.hidden_size), depth=list(self.depth), num_heads=list(self.num_heads))
        return d


# ----------------------------------------------------------------------------- embeddings


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE/DiT fixed 2D sin-cos position embedding, (grid², dim) fp32, tokens row-major.

    The first ``dim/2`` entries encode the column index, the last ``dim/2`` the row index; each half
    is ``[sin(pos·ω), cos(pos·ω)]`` with ``ω_k = 10000^(-k/(dim/4))``.  Computed in fp64 like the
    original numpy code.
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed: dim must be a multiple of 4, got {dim}")

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = pos[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    coords = torch.arange(grid, dtype=torch.float64)
    rows = coords.repeat_interleave(grid)  # token n = r·g + c
    cols = coords.repeat(grid)
    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Gaussian Fourier time embedding: ``mlp([sin(2π·t·W), cos(2π·t·W)])`` with a fixed ``W ~ N(0, 1)``.

    ``W`` (``embedding_size``,) is stored in checkpoints but never trained; the Fourier features are
    always computed in fp32 (t is in [0, 1] but ``2π·t·W`` reaches ~30, too large for bf16 angles).
    """

    def __init__(self, hidden_size: int, embedding_size: int = 256):
        super().__init__()
        self.register_buffer("W", torch.randn(embedding_size))
        self.mlp = nn.Sequential(
            nn.Linear(2 * embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def fourier(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) → (B, 2·embedding_size) fp32."""
        ang = t.float()[:, None] * self.W.float()[None, :] * 2 * torch.pi
        return torch.cat([ang.sin(), ang.cos()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) → (B, hidden_size)."""
        e = self.fourier(t)
        return self.mlp(e.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """``num_classes + 1`` rows; the last (index ``num_classes``) is the null class of CFG / label drop-out."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class DiTRoPE(nn.Module):
    """EVA-style 2D RoPE table (method §4) as the buffers ``freqs_cos`` / ``freqs_sin``, each (N, head_dim)."""

    def __init__(self, head_dim: int, grid: int):
        super().__init__()
        cos, sin = eva_rope_table(head_dim, grid)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (1, N, head_dim), the form :class:`rectok_fast.nn.Attention` takes."""
        return self.freqs_cos.unsqueeze(0), self.freqs_sin.unsqueeze(0)

    def extra_repr(self) -> str:
        return f"tokens={self.freqs_cos.shape[0]}, head_dim={self.freqs_cos.shape[1]}"


# ----------------------------------------------------------------------------- blocks


class DiTDHBlock(nn.Module):
    """adaLN transformer block: RMSNorm → modulate → attention (RoPE) → gate; same for the SwiGLU MLP.

    ``c`` is (B, w) (one condition per sample: the encoder blocks) or (B, N, w) (per token: the head blocks).
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        qk_norm: bool = False,
        wo_shift: bool = False,
        attn_backend: str | None = None,
    ):
        super().__init__()
        self.wo_shift = wo_shift
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, num_heads, qkv_bias=True, qk_norm=qk_norm, backend=attn_backend)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width, swiglu_hidden(width, mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, (4 if wo_shift else 6) * width))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x (B, N, w), c (B, w) or (B, N, w) → (B, N, w)."""
        if c.dim() < x.dim():
            c = c.unsqueeze(1)
        mod = self.adaLN_modulation(c)
        if self.wo_shift:
            scale1, gate1, scale2, gate2 = mod.chunk(4, dim=-1)
            shift1 = shift2 = None
        else:
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope=rope)
        x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """RMSNorm, adaLN (shift, scale) from the per-token condition, Linear(w → p²·C)."""

    def __init__(self, width: int, out_features: int):
        super().__init__()
        self.norm_final = RMSNorm(width)
        self.linear = nn.Linear(width, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.dim() < x.dim():
            c = c.unsqueeze(1)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    """Conv2d(C → w, p, stride p) with tokens flattened row-major: (B, C, H, W) → (B, N, w)."""

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------- model


class DiTDH(nn.Module):
    """DiT with a DDT head (method §4).  ``forward(x, t, y)``: latents (B, C, g, g), t (B,) with t = 1 the
    data, labels y (B,) in ``[0, num_classes]`` (``num_classes`` is the null class) → velocity (B, C, g, g).

    Build by size with :meth:`from_size` (``"S"``, ``"B"``, ``"L"``, ``"XL"``), from a released
    checkpoint with :meth:`from_official`, or from our own format with :meth:`from_pretrained`.
    """

    def __init__(self, config: DiTDHConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = DiTDHConfig(**kwargs)
        elif kwargs:
            raise TypeError("DiTDH: pass either a DiTDHConfig or keyword arguments, not both")
        self.config = cfg = config
        w_enc, w_dec = cfg.hidden_size
        p, g = cfg.patch_size, cfg.grid
        self.in_channels = cfg.in_channels
        self.num_classes = cfg.num_classes

        self.x_embedder = PatchEmbed(cfg.in_channels, w_dec, p)
        self.s_embedder = PatchEmbed(cfg.in_channels, w_enc, p)
        self.s_projector = nn.Linear(w_enc, w_dec) if w_enc != w_dec else nn.Identity()
        self.t_embedder = TimestepEmbedder(w_enc)
        self.y_embedder = LabelEmbedder(cfg.num_classes, w_enc)
        self.final_layer = FinalLayer(w_dec, p * p * cfg.in_channels)
        if cfg.use_pos_embed:
            self.register_buffer("pos_embed", sincos_pos_embed(w_enc, g).unsqueeze(0))
        else:
            self.pos_embed = None
        if cfg.use_rope:
            self.enc_feat_rope = DiTRoPE(cfg.head_dims[0], g)
            self.dec_feat_rope = DiTRoPE(cfg.head_dims[1], g)
        else:
            self.enc_feat_rope = self.dec_feat_rope = None
        d_enc, d_dec = cfg.depth
        self.blocks = nn.ModuleList(
            DiTDHBlock(
                w_enc if i < d_enc else w_dec,
                cfg.num_heads[0] if i < d_enc else cfg.num_heads[1],
                cfg.mlp_ratio,
                qk_norm=cfg.qk_norm,
                wo_shift=cfg.wo_shift,
                attn_backend=cfg.attn_backend,
            )
            for i in range(d_enc + d_dec)
        )
        self.initialize_weights()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_size(cls, size: str, **kwargs) -> DiTDH:
        """``DiTDH.from_size("XL", in_channels=128, input_size=16, num_classes=1000)``."""
        key = size.upper().removeprefix("DITDH-").removeprefix("DITDH_")
        if key not in DITDH_SIZES:
            raise ValueError(f"DiTDH.from_size: unknown size {size!r}; choose from {sorted(DITDH_SIZES)}")
        return cls(DiTDHConfig(**{**DITDH_SIZES[key], **kwargs}))

    def initialize_weights(self) -> None:
        """The official initialisation: xavier Linear/conv, N(0, 0.02) label table and time MLP,
        zero adaLN and zero output layer (the model starts as the zero velocity)."""
        if any(p.is_meta for p in self.parameters()):
            return

        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        for emb in (self.x_embedder, self.s_embedder):
            w = emb.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(emb.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def default_shift(self) -> float:
        """Resolution-dependent time shift ``sqrt(g·g·C / 4096)`` (√8 for 16×16×128, √2 for 8×8×128;
        :func:`rectok_fast.schedules.default_shift`)."""
        return _default_shift(self.config.input_size, self.config.in_channels)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def ops_backend(self) -> str:
        """The ``backend`` of every fused op the model's training objective calls (the flow-matching
        ``x_t`` and loss of :func:`training_loss`, unless it is given ``backend=``): ``"auto"``
        (default: Triton on CUDA tensors, the PyTorch reference elsewhere), ``"triton"`` or
        ``"reference"``.  The network itself runs no fused op.  Initially ``config.ops_backend``."""
        return self.config.ops_backend

    @ops_backend.setter
    def ops_backend(self, backend: str) -> None:
        if backend not in BACKENDS_TRITON:
            raise ValueError(f"DiTDH: `ops_backend` must be one of {BACKENDS_TRITON}, got {backend!r}")
        if backend != self.config.ops_backend:  # a copy: a config shared with another model is left alone
            self.config = dataclasses.replace(self.config, ops_backend=backend)

    def training_loss(self, x1: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        """:func:`training_loss` of this (unwrapped) model: ``model.training_loss(x1, y, noise=x0, t=t)``."""
        return training_loss(self, x1, y, **kwargs)

    # ------------------------------------------------------------------ forward

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p²·C) → (B, C, g·p, g·p); output feature ``(py·p + px)·C + c`` goes to pixel ``(c, r·p+py, q·p+px)``."""
        B, p, C, g = x.shape[0], self.config.patch_size, self.in_channels, self.config.grid
        x = x.reshape(B, g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, g * p, g * p)

    def encode_condition(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The DiT encoder: per-token condition ``s`` (B, N, hidden[1]) for the DDT head."""
        t_emb = self.t_embedder(t)  # (B, w0)
        c = F.silu(t_emb + self.y_embedder(y))
        s = self.s_embedder(x)
        if self.pos_embed is not None:
            s = s + self.pos_embed.to(s.dtype)
        rope = self.enc_feat_rope() if self.enc_feat_rope is not None else None
        for blk in self.blocks[: self.config.depth[0]]:
            s = blk(s, c, rope)
        s = F.silu(t_emb.unsqueeze(1) + s)
        return self.s_projector(s)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, g, g), t (B,) or scalar in [0, 1] (1 = data), y (B,) int labels → velocity (B, C, g, g)."""
        check_tensor("DiTDH", "x", x, ndim=4)
        B = x.shape[0]
        if tuple(x.shape[1:]) != (self.in_channels, self.config.input_size, self.config.input_size):
            raise ValueError(
                f"DiTDH: `x` must have shape (B, {self.in_channels}, {self.config.input_size}, "
                f"{self.config.input_size}), got {tuple(x.shape)}"
            )
        if not isinstance(t, torch.Tensor):
            t = torch.full((B,), float(t), device=x.device)
        elif t.dim() == 0:
            t = t.expand(B)
        check_tensor("DiTDH", "y", y, ndim=1, dtypes=(torch.int64, torch.int32))
        if t.shape != (B,) or y.shape != (B,):
            raise ValueError(f"DiTDH: `t` and `y` must have shape ({B},), got {tuple(t.shape)} and {tuple(y.shape)}")
        s = self.encode_condition(x, t, y)
        h = self.x_embedder(x)
        rope = self.dec_feat_rope() if self.dec_feat_rope is not None else None
        for blk in self.blocks[self.config.depth[0] :]:
            h = blk(h, s, rope)
        return self.unpatchify(self.final_layer(h, s))

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_channels={c.in_channels}, input_size={c.input_size}, patch_size={c.patch_size}, "
            f"hidden={list(c.hidden_size)}, depth={list(c.depth)}, heads={list(c.num_heads)}, classes={c.num_classes}"
        )

    # ------------------------------------------------------------------ official checkpoints

    @classmethod
    def from_official(
        cls,
        obj,
        use_ema: bool = True,
        *,
        device: torch.device | str | None = None,
        trust_remote_code: bool | None = None,
        **overrides,
    ) -> DiTDH:
        """Load a released DiT^DH checkpoint, inferring the configuration from the shapes.

        ``obj``: a path to an official ``.pth`` (or ``.safetensors``), a loaded checkpoint dict
        (``{"model": ..., "model_ema": ...}``; ``model_ema`` is taken when ``use_ema``), or a bare
        state dict.  ``overrides`` replace inferred config fields (e.g. ``attn_backend="sdpa_flash"``;
        ``depth`` when encoder and head have the same width and the split cannot be inferred).
        The model is built on the meta device and the checkpoint tensors are assigned to it (no second
        copy); ``device`` moves it afterwards.  Returns the model in eval mode.
        A ``.pth`` is read with ``torch.load(weights_only=True)`` (allow-listed ``argparse.Namespace``
        etc.); a file needing any other global raises
        :class:`~rectok_fast.utils.checkpoint.UnsafeCheckpointError` unless ``trust_remote_code=True``.
        """
        from .loading import official_state_dict  # loading.py sits above this module (it builds DiTs)

        sd = official_state_dict(
            obj, use_ema=use_ema, what="DiTDH.from_official", trust_remote_code=trust_remote_code, mmap=True
        )
        if "x_embedder.proj.weight" not in sd:
            raise ValueError(
                "DiTDH.from_official: no `x_embedder.proj.weight` in the checkpoint; is it a DiT^DH state dict?"
            )
        cfg = infer_ditdh_config(sd, **overrides)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
        if device is not None:
            model = model.to(device)
        return model.eval()

    # ------------------------------------------------------------------ our own format

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``."""
        save_export(directory, "ditdh", self.config.to_dict(), self.state_dict(), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        filename: str | None = None,
        revision: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        use_ema: bool = True,
        trust_remote_code: bool | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        **overrides,
    ) -> DiTDH:
        """A DiT^DH in eval mode from, in this order of precedence:

        1. a local path: a :meth:`save_pretrained` directory, a training run directory or a checkpoint
           file (an official ``.pth``: EMA weights when ``use_ema``);
        2. a registry name: ``ditdh-xl-80e``, ``ditdh-xl-600e``, ``ditdh-s-30e`` (the released models;
           see :data:`rectok_fast.hub.REGISTRY`);
        3. a Hugging Face hub repository id (``filename=``, ``revision=``): one of our exports
           (``config.json`` + ``model.safetensors``) or a file in it; ``QingyuShi/RecTok`` alone is
           ``ditdhxl_epoch_0599.pth``.

        Hub files go through the ``huggingface_hub`` cache (``cache_dir`` or ``HF_HUB_CACHE``;
        ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``: the cache only).  Checkpoints are read with
        ``weights_only=True`` (:mod:`rectok_fast.models.loading`; ``trust_remote_code`` is the opt-in).
        ``device`` / ``dtype``: where and in what precision the model ends up; ``overrides`` replace
        configuration fields (exports and checkpoint files)::

            dit = DiTDH.from_pretrained("ditdh-xl-600e", device="cuda", dtype=torch.bfloat16)
        """
        from ..hub import load_pretrained

        def load_export(path: str) -> DiTDH:
            from safetensors.torch import load_file

            with open(os.path.join(path, "config.json")) as f:
                raw = json.load(f)
            if raw.get("model_type", "ditdh") != "ditdh":
                from ..errors import CheckpointError

                raise CheckpointError(
                    f"DiTDH.from_pretrained: {path} holds a {raw['model_type']!r} model, not a DiT^DH"
                )
            names = {f.name for f in fields(DiTDHConfig)}
            cfg = DiTDHConfig(**{k: v for k, v in {**raw, **overrides}.items() if k in names})
            sd = load_file(os.path.join(path, "model.safetensors"), device=str(device or "cpu"))
            with torch.device("meta"):
                model = cls(cfg)
            model.load_state_dict(sd, strict=True, assign=True)
            return model

        return load_pretrained(
            cls,
            "dit",
            name_or_path,
            load_export,
            filename=filename,
            revision=revision,
            device=device,
            dtype=dtype,
            use_ema=use_ema,
            trust_remote_code=trust_remote_code,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            overrides=overrides,
        )


# ----------------------------------------------------------------------------- config inference


def infer_ditdh_config(sd: Mapping[str, torch.Tensor], **overrides) -> DiTDHConfig:
    """Infer a :class:`DiTDHConfig` from an official state dict's shapes.

    Widths from ``s_embedder`` / ``x_embedder``; channels and patch size from ``x_embedder``; grid
    from ``pos_embed`` (or the RoPE tables); heads from the RoPE tables ((N, head_dim) each);
    classes from the label table (``num_classes + 1`` rows); depths from the block widths.
    """
    xw = sd["x_embedder.proj.weight"]
    w_dec, C, p = xw.shape[0], xw.shape[1], xw.shape[-1]
    w_enc = sd["s_embedder.proj.weight"].shape[0]
    if sd["s_embedder.proj.weight"].shape[-1] != p:
        raise NotImplementedError("DiTDH: different patch sizes for s_embedder and x_embedder are not supported")
    use_rope = "enc_feat_rope.freqs_cos" in sd
    use_pos = "pos_embed" in sd
    if use_pos:
        n_tok = sd["pos_embed"].shape[1]
    elif use_rope:
        n_tok = sd["enc_feat_rope.freqs_cos"].shape[0]
    else:
        n_tok = None
    cfg: dict = {
        "in_channels": C,
        "patch_size": p,
        "hidden_size": (w_enc, w_dec),
        "num_classes": sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        "use_rope": use_rope,
        "use_pos_embed": use_pos,
        "qk_norm": any(k.endswith("attn.q_norm.weight") for k in sd),
    }
    if n_tok is not None:
        g = math.isqrt(n_tok)
        if g * g != n_tok:
            raise ValueError(f"DiTDH: {n_tok} tokens is not a square grid")
        cfg["input_size"] = g * p
    if use_rope:
        hd = (sd["enc_feat_rope.freqs_cos"].shape[1], sd["dec_feat_rope.freqs_cos"].shape[1])
        cfg["num_heads"] = (w_enc // hd[0], w_dec // hd[1])

    block_ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    n_blocks = len(block_ids)
    if block_ids != list(range(n_blocks)):
        raise ValueError(f"DiTDH: block indices are not contiguous: {block_ids}")
    widths = [sd[f"blocks.{i}.norm1.weight"].shape[0] for i in range(n_blocks)]
    if w_enc != w_dec:
        d_enc = sum(1 for w in widths if w == w_enc)
        if widths != [w_enc] * d_enc + [w_dec] * (n_blocks - d_enc):
            raise ValueError(f"DiTDH: unexpected block widths {widths}")
        cfg["depth"] = (d_enc, n_blocks - d_enc)
    elif "depth" not in overrides:
        warnings.warn(
            "DiTDH.from_official: encoder and head have the same width, the split cannot be inferred; "
            "assuming a 2-block head (pass depth=(enc, head) to override)",
            stacklevel=3,
        )
        cfg["depth"] = (n_blocks - 2, 2)
    blk0 = 0
    mlp_hidden = sd[f"blocks.{blk0}.mlp.w3.weight"].shape[1]
    cfg["mlp_ratio"] = 4.0
    if swiglu_hidden(w_enc, 4.0) != mlp_hidden:
        ratio = 1.5 * (mlp_hidden + 0.5) / w_enc
        if swiglu_hidden(w_enc, ratio) != mlp_hidden:
            raise ValueError(f"DiTDH: cannot infer mlp_ratio from SwiGLU hidden {mlp_hidden} at width {w_enc}")
        cfg["mlp_ratio"] = ratio
    cfg["wo_shift"] = sd[f"blocks.{blk0}.adaLN_modulation.1.weight"].shape[0] == 4 * widths[0]
    cfg.update(overrides)
    if "num_heads" not in cfg:
        raise ValueError(
            "DiTDH.from_official: no RoPE tables to infer the head counts from; pass num_heads=(enc, head)"
        )
    if "input_size" not in cfg:
        raise ValueError("DiTDH.from_official: no pos_embed or RoPE table to infer the grid from; pass input_size=")
    return DiTDHConfig(**cfg)


# ----------------------------------------------------------------------------- training objective


def label_drop_mask(
    batch: int | tuple[int, ...],
    p: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B,) bool, True with probability ``p``: which labels classifier-free training replaces by the
    null class.  Always one ``U(0, 1)`` draw per sample (also for ``p = 0``), so a trainer's random
    stream does not depend on ``p``."""
    return torch.rand(batch, device=device, generator=generator) < p


def drop_labels(
    y: torch.Tensor,
    num_classes: int,
    p: float = 0.0,
    *,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace labels y (B,) by the null class ``num_classes`` where ``mask`` (B,) bool is True, or,
    without ``mask``, each with probability ``p`` (:func:`label_drop_mask`; nothing is drawn for ``p <= 0``)."""
    if mask is None:
        if p <= 0:
            return y
        mask = label_drop_mask(y.shape, p, device=y.device, generator=generator)
    return torch.where(mask, torch.full_like(y, num_classes), y)


def training_loss(
    model: DiTDH,
    x1: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    sample_offset: int = 0,
    label_drop: float = 0.1,
    drop_mask: torch.Tensor | None = None,
    shift: float | None = None,
    t: torch.Tensor | None = None,
    backend: str | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    cosine_weight: float = 0.0,
) -> torch.Tensor:
    """One flow-matching training loss (method §4), a 0-dim fp32 tensor.

    Args:
        model: the :class:`DiTDH` (``model(x, t, y)`` → velocity) being trained, possibly wrapped
            (DDP, FSDP, ``torch.compile``).
        x1: data latents (B, C, g, g); y: labels (B,) in ``[0, num_classes)``.
        seed: x0 ~ N(0, I) is generated inside the fused ops from this seed (python int or 1-element
            int64 tensor; a tensor avoids recompiles) and regenerated, never stored.  When neither
            ``seed`` nor ``noise`` is given: on the fused path (CUDA, or ``backend="triton"``) a seed
            is drawn on the device with ``torch.randint``; on the reference path x0 is drawn with
            ``torch.randn_like`` (both from torch's default generator, no host sync, compile-friendly).
        noise: explicit x0 (B, C, g, g) instead of ``seed``.
        sample_offset: global index of this batch's first sample: with ``seed`` on the Triton path,
            sample ``b`` gets the x0 of global sample ``b + sample_offset`` (a rank's slice of a global
            batch then draws that batch's numbers; see :func:`rectok_fast.ops.flow_matching_xt`).
        label_drop: probability of replacing a label by the null class ``num_classes`` (ignored
            with ``drop_mask``).
        drop_mask: explicit (B,) bool label drop-out (True: the null class), e.g. a slice of
            :func:`label_drop_mask` drawn for a global batch.
        shift: time shift s (None: ``model.default_shift``) of :func:`~rectok_fast.schedules.training_time`:
            ``t = 1 - s·u/(1 + (s-1)·u)``, u ~ U(0, 1), and ``t = u`` when s ≤ 1.
        t: explicit times (B,) instead of sampling them.
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` for the fused flow-matching ops (None: the
            model's :attr:`DiTDH.ops_backend`, ``"auto"`` for a model without one).
        autocast: a context manager entered around the model call only (e.g. ``torch.autocast``); ``x_t``
            and the loss are computed outside it, the prediction upcast to fp32 first.
        cosine_weight: LightningDiT's cosine term (``use_cosine_loss``; 0, the default, leaves it out):
            adds ``cosine_weight · mean over (b, h, w) of (1 − cos(v, x1 − x0))`` over the channel dim
            (see :func:`rectok_fast.ops.flow_matching_loss`; fused, x0 regenerated).

    Returns ``mean((v(x_t, t, y') - (x1 - x0))²)`` with ``x_t = t·x1 + (1 - t)·x0``.
    Compiles with ``torch.compile(fullgraph=True)`` (except a tensor ``seed`` on the reference path,
    whose ``torch.Generator`` needs the seed on the host).
    """
    if seed is not None and noise is not None:
        raise ValueError("training_loss: pass either `seed` or `noise`, not both")
    B = x1.shape[0]
    core = getattr(model, "module", model)  # DDP / FSDP wrappers: attributes live on the wrapped module
    if backend is None:
        backend = getattr(core, "ops_backend", "auto")
    if seed is None and noise is None:
        if takes_fused_path(backend, x1):  # the ops' resolver decides: a seed for the in-kernel noise
            seed = torch.randint(0, 2**62, (1,), device=x1.device, dtype=torch.int64)
        else:
            noise = torch.randn_like(x1)
    if t is None:
        t = training_time(B, core.default_shift if shift is None else shift, device=x1.device)
    y = drop_labels(y, core.num_classes, label_drop, mask=drop_mask)
    nz = {"seed": seed, "noise": noise, "sample_offset": sample_offset, "backend": backend}
    x_t = flow_matching_xt(x1, t, **nz)
    with autocast if autocast is not None else contextlib.nullcontext():
        pred = model(x_t, t, y)
    if cosine_weight:
        nz["cosine_weight"] = cosine_weight
    return flow_matching_loss(pred.float(), x1, t, **nz)
