"""The RecTok tokenizer (method §1–§3) on the fused ops.

Module and parameter names follow the released checkpoints (``encoder.*``, ``decoder.*``,
``sem_decoders.<teacher>.*``), so :meth:`RecTok.from_official` is a shape inference plus a plain
``load_state_dict``.  Hot paths go through :mod:`rectok_fast.ops`: the visible-only patch embedding
(``patchify(images, p, ids_keep)`` then a Linear with the Conv2d weight reshaped), the gather of
position embeddings and RoPE rows (``ops.gather_tokens``), the mask-token insertion
(``ops.restore_tokens``), the pixel head's unpatchify (``ops.unpatchify``); the flow time, posterior
sample, flow interpolation and KL go through :class:`rectok_fast.nn.FlowNoiser` (``ops.posterior_flow``,
times from :mod:`rectok_fast.schedules`, t = 1 is noise) and the semantic loss through
:class:`rectok_fast.nn.CosineAlignLoss` (``ops.cosine_align_loss``).  Every one of those ops runs on
the model's :attr:`RecTok.ops_backend` (``"auto"`` | ``"triton"`` | ``"reference"``; config key
``ops_backend``), so a whole model can be switched to the PyTorch reference (the convergence test
trains both and compares).

Masking (training) draws the ratio ``r`` and the kept count ``K`` on the host
(:meth:`RecTok.sample_mask`, from the host RNG whose state is :attr:`RecTok.mask_rng_state`), the
permutation on the device (optionally from a ``torch.Generator``); no host-device sync.  Under
``torch.compile`` pass the mask in (``model(images, mask=model.sample_mask(B, device))``): the kept
dim of ``ids_keep`` is marked dynamic (also by :meth:`Mask.rows`), so changing mask ratios never recompile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._backend import BACKENDS_TRITON
from .._validate import trusted_indices
from ..masking import Mask, random_masking
from ..nn.fused import SEMANTIC_TARGETS, CosineAlignLoss, FlowNoiser, check_backend
from ..nn.layers import Block, RMSNorm
from ..nn.rope import rectok_rope_table

# each functional from its op module (rectok_fast.ops re-exports them too; the module names the chain)
from ..ops.patchify import patchify, unpatchify
from ..ops.posterior_flow import posterior_flow
from ..ops.tokens import gather_tokens, restore_tokens
from ..schedules import TOKENIZER_SCHEDULES, default_shift
from ..utils.checkpoint import save_export

logger = logging.getLogger("rectok_fast")

# name -> (width, depth, heads); the original SIZE_DICT
RECTOK_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 3, 4),
    "tiny_l": (1024, 3, 16),
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "xl": (1152, 28, 16),
    "huge": (1280, 32, 16),
}
_HEADS_BY_WIDTH = {192: 4, 512: 8, 768: 12, 1024: 16, 1152: 16, 1280: 16}

NOISE_SCHEDULES = TOKENIZER_SCHEDULES  # defined once, in rectok_fast.schedules
SEM_TARGETS = SEMANTIC_TARGETS  # defined once, in rectok_fast.nn.fused
SEM_INPUTS = ("noisy", "clean")
SEM_LOSSES = ("cosine", "l1", "l2")
OPS_BACKENDS = BACKENDS_TRITON  # RecTok(ops_backend=...): "auto" | "triton" | "reference"


def patch_backend(ops_backend: str) -> str:
    """The ``backend`` of the C++ patch ops for a model-wide ``ops_backend`` (``"triton"`` -> ``"cpp"``:
    the fused path of every op)."""
    return "cpp" if ops_backend == "triton" else ops_backend


def _size(spec: str | tuple[int, int, int] | list[int]) -> tuple[int, int, int]:
    if isinstance(spec, str):
        if spec not in RECTOK_SIZES:
            raise ValueError(f"RecTok: unknown size {spec!r}; known: {sorted(RECTOK_SIZES)} or (width, depth, heads)")
        return RECTOK_SIZES[spec]
    width, depth, heads = (int(v) for v in spec)
    return width, depth, heads


@dataclass
class RecTokConfig:
    """Everything that defines a RecTok model.  Sizes are a name of :data:`RECTOK_SIZES` or
    ``(width, depth, heads)``; ``teachers`` maps a teacher name to its feature width (one semantic
    decoder each)."""

    img_size: int = 256
    patch_size: int = 16
    token_channels: int = 128
    encoder: str | tuple[int, int, int] = "base"
    decoder: str | tuple[int, int, int] = "base"
    sem_decoder: str | tuple[int, int, int] = "tiny"
    teachers: dict[str, int] = field(default_factory=lambda: {"dinov3": 1024})
    mask_ratio: float = 0.4
    mask_ratio_min: float = -0.1
    random_mask_ratio: bool = True
    gamma: float = 1.0
    noise_schedule: str = "shift"
    sem_input_type: str = "noisy"
    sem_target: str = "rec+align"
    sem_loss: str = "cosine"
    qk_norm: bool = False
    scale_factor: float = 1.0
    attn_backend: str | None = None
    # backend of every fused op the model calls (RecTok.ops_backend); a runtime choice, not architecture
    ops_backend: str = field(default="auto", compare=False)

    def __post_init__(self):
        check_backend("RecTokConfig", self.ops_backend, "ops_backend")
        if self.img_size % self.patch_size:
            raise ValueError(f"RecTok: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for name, value, allowed in (
            ("noise_schedule", self.noise_schedule, NOISE_SCHEDULES),
            ("sem_target", self.sem_target, SEM_TARGETS),
            ("sem_input_type", self.sem_input_type, SEM_INPUTS),
            ("sem_loss", self.sem_loss, SEM_LOSSES),
        ):
            if value not in allowed:
                raise ValueError(f"RecTok: `{name}` must be one of {allowed}, got {value!r}")
        if not self.mask_ratio_min <= self.mask_ratio < 1:
            raise ValueError(
                f"RecTok: need mask_ratio_min <= mask_ratio < 1, got ({self.mask_ratio_min}, {self.mask_ratio})"
            )
        self.teachers = {str(k): int(v) for k, v in self.teachers.items()}

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2


class DefaultLatentStatsWarning(UserWarning):
    """:meth:`RecTok.detokenize` on a tokenizer whose latent statistics were never set."""


@dataclass
class RecTokOutput:
    """What the training forward returns (shapes for batch B, N tokens, K visible, C channels)."""

    reconstruction: torch.Tensor  # (B, 3, H, W), [-1, 1] image scale
    # (B, K, C) posterior sample; None when not computed (γ > 0, noisy semantic input, no return_z=True)
    z: torch.Tensor | None
    z_t: torch.Tensor  # (B, K, C) flow-interpolated latents fed to the pixel decoder
    kl: torch.Tensor  # () KL summed over tokens and channels, averaged over the batch
    t: torch.Tensor | None  # (B,) flow time (None without the flow)
    sem_pred: dict[str, torch.Tensor]  # teacher name -> (B, N, width) predicted features
    teacher_features: dict[str, torch.Tensor]  # teacher name -> (B, N, width) teacher features (when available)
    sem_losses: dict[str, torch.Tensor]  # teacher name -> () loss
    sem_loss: torch.Tensor | None  # () mean of sem_losses
    ids_keep: torch.Tensor | None  # (B, K)
    ids_restore: torch.Tensor | None  # (B, N)
    token_mask: torch.Tensor | None  # (B, N) bool, True where a token was masked

    @property
    def sem_target(self) -> dict[str, torch.Tensor]:
        """Deprecated name of :attr:`teacher_features`."""
        warnings.warn(
            "RecTokOutput.sem_target is deprecated; use RecTokOutput.teacher_features",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.teacher_features


# ----------------------------------------------------------------------------- sub-modules


class _Trunk(nn.Module):
    """ln_pre -> blocks (with the tokenizer RoPE) -> ln_post, shared by the three transformers."""

    def __init__(
        self, width: int, depth: int, heads: int, grid: int, qk_norm: bool, backend: str | None, ops_backend: str
    ):
        super().__init__()
        self.ops_backend = ops_backend  # of the fused token/patch ops (set model-wide by RecTok.ops_backend)
        if (width // heads) % 4:
            raise ValueError(
                f"RecTok: head dim {width // heads} (width {width} / {heads} heads) must be a multiple of 4"
            )
        self.ln_pre = RMSNorm(width)
        self.transformer = nn.ModuleList(Block(width, heads, qk_norm=qk_norm, backend=backend) for _ in range(depth))
        self.ln_post = RMSNorm(width)
        self.register_buffer("rope_table", rectok_rope_table(width // heads, grid), persistent=False)  # (N, 2·hd)

    def _blocks(self, x: torch.Tensor, rope_table: torch.Tensor) -> torch.Tensor:
        """x (B, L, width); rope_table (B|1, L, 2·head_dim)."""
        cos, sin = rope_table.chunk(2, dim=-1)
        x = self.ln_pre(x)
        for block in self.transformer:
            x = block(x, rope=(cos, sin))
        return self.ln_post(x)


class Encoder(_Trunk):
    """ViT encoder: Conv2d patch embedding (run as a Linear over visible patches) + position
    embedding, optional masking, blocks, ``latent_head`` to 2C moments."""

    def __init__(self, cfg: RecTokConfig):
        width, depth, heads = _size(cfg.encoder)
        super().__init__(width, depth, heads, cfg.grid, cfg.qk_norm, cfg.attn_backend, cfg.ops_backend)
        self.patch_size = cfg.patch_size
        self.patch_embed = nn.Sequential(nn.Conv2d(3, width, cfg.patch_size, cfg.patch_size))
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(1, cfg.num_tokens, width))
        self.latent_head = nn.Linear(width, 2 * cfg.token_channels)

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1]; ids_keep (B, K) or None -> moments (B, K|N, 2C)."""
        conv, be = self.patch_embed[0], self.ops_backend
        patches = patchify(images, self.patch_size, ids_keep, backend=patch_backend(be))  # (B, K, 3·p·p), (c, py, px)
        x = F.linear(patches, conv.weight.flatten(1), conv.bias)  # (B, K, width)
        if ids_keep is None:
            x = x + self.positional_embedding
            rope = self.rope_table.unsqueeze(0)
        else:
            x = x + gather_tokens(self.positional_embedding, ids_keep, backend=be)
            rope = gather_tokens(self.rope_table, ids_keep, backend=be)  # (B, K, 2·head_dim)
        return self.latent_head(self._blocks(x, rope))


class Decoder(_Trunk):
    """Pixel decoder: ``decoder_embed``, mask tokens, position embedding, blocks, a 1×1 conv to
    ``p·p·3`` channels per token (``ffn.1``), unpatchify, ``conv_out`` 3×3."""

    def __init__(self, cfg: RecTokConfig):
        width, depth, heads = _size(cfg.decoder)
        super().__init__(width, depth, heads, cfg.grid, cfg.qk_norm, cfg.attn_backend, cfg.ops_backend)
        p = cfg.patch_size
        self.patch_size, self.grid = p, cfg.grid
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(1, cfg.num_tokens, width))
        self.mask_token = nn.Parameter(width**-0.5 * torch.randn(1, 1, width))
        self.decoder_embed = nn.Linear(cfg.token_channels, width)
        # index 0 is the official Rearrange (no parameters); keeps the key name ``ffn.1``
        self.ffn = nn.Sequential(nn.Identity(), nn.Conv2d(width, p * p * 3, 1))
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def _head_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 1×1 conv as a Linear whose outputs are in patchify's (c, py, px) order.

        The official output channel ``(py·p + px)·3 + c`` goes to pixel ``(c, py, px)`` of the patch.
        """
        conv, p = self.ffn[1], self.patch_size
        w = conv.weight.reshape(p, p, 3, -1).permute(2, 0, 1, 3).reshape(3 * p * p, -1)
        b = conv.bias.reshape(p, p, 3).permute(2, 0, 1).reshape(-1)
        return w, b

    def forward(self, z: torch.Tensor, ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, K, C) with ``ids_restore`` (B, N), or (B, N, C) -> image (B, 3, H, W) in [-1, 1] scale."""
        x = self.decoder_embed(z)
        if ids_restore is None:
            x = x + self.positional_embedding
        else:
            x = restore_tokens(x, ids_restore, self.mask_token, self.positional_embedding, backend=self.ops_backend)
        x = self._blocks(x, self.rope_table.unsqueeze(0))
        w, b = self._head_weight()
        pixels = unpatchify(F.linear(x, w, b), self.patch_size, 3, self.grid, backend=patch_backend(self.ops_backend))
        return self.conv_out(pixels)


class SemanticDecoder(_Trunk):
    """The small transformer that predicts a teacher's patch features for all N tokens."""

    def __init__(self, cfg: RecTokConfig, teacher_width: int):
        width, depth, heads = _size(cfg.sem_decoder)
        super().__init__(width, depth, heads, cfg.grid, False, cfg.attn_backend, cfg.ops_backend)
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(1, cfg.num_tokens, width))
        self.token_embedding = nn.Linear(cfg.token_channels, width)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, width))
        self.out = nn.Linear(width, teacher_width)

    def forward(self, z: torch.Tensor, ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, K, C) with ``ids_restore`` (B, N), or (B, N, C) -> features (B, N, teacher_width)."""
        x = self.token_embedding(z)
        if ids_restore is None:
            x = x + self.positional_embedding
        else:
            x = restore_tokens(x, ids_restore, self.mask_embedding, self.positional_embedding, backend=self.ops_backend)
        return self.out(self._blocks(x, self.rope_table.unsqueeze(0)))


# ----------------------------------------------------------------------------- the model


class RecTok(nn.Module):
    """RecTok visual tokenizer.

    Example::

        model = RecTok.from_official("rectok_bb_ch128.pth").cuda()  # eval mode, EMA weights
        model.set_latent_stats(mean, std)                           # (C,) each, for generation
        tokens = model.tokenize(images)                              # (B, 128, 16, 16), images in [-1, 1]
        recon = model.detokenize(tokens)                             # (B, 3, 256, 256) in [0, 1]
    """

    def __init__(self, config: RecTokConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = RecTokConfig(**kwargs)
        elif kwargs:
            config = RecTokConfig(**{**asdict(config), **kwargs})
        self.config = config
        # Init order: the encoder and the pixel decoder are built, then re-initialised by _init_weights
        # (trunc-normal std 0.02 weights, zero biases of every Linear/Conv2d); the semantic decoders are
        # built after it and keep PyTorch's default Linear init.  Moving the apply() changes their
        # init, and moving any line here changes what a seeded RecTok(config) draws.
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.apply(_init_weights)
        self.sem_decoders = nn.ModuleDict({name: SemanticDecoder(config, w) for name, w in config.teachers.items()})
        C = config.token_channels
        self.register_buffer("latent_mean", torch.zeros(C))
        self.register_buffer("latent_std", torch.ones(C))
        self.teachers: dict[str, nn.Module] = {}  # frozen feature extractors, not part of the state dict
        self._mask_rng = random.Random()
        # the training forward's two chores, owned by the nn modules (no parameters, no state dict entries)
        self.noiser = FlowNoiser(gamma=config.gamma, schedule=config.noise_schedule, shift=self.timestep_shift)
        self.sem_criterion = CosineAlignLoss(config.sem_target)
        self.ops_backend = config.ops_backend  # one backend for every fused op (see the property)

    # ---------------------------------------------------------------- properties

    @property
    def grid(self) -> int:
        return self.config.grid

    @property
    def token_channels(self) -> int:
        return self.config.token_channels

    @property
    def ops_backend(self) -> str:
        """The ``backend`` of every fused op the model calls: ``"auto"`` (default: the fused kernels on
        CUDA tensors, the PyTorch reference elsewhere), ``"triton"`` (the fused path of every op —
        Triton, and the C++ extension for patchify/unpatchify — raising where it cannot run) or
        ``"reference"`` (PyTorch everywhere).  Assigning it reaches the patch and token ops of the
        three transformers, :attr:`noiser` (``posterior_flow``, with the KL) and
        :attr:`sem_criterion` (``cosine_align_loss``); ``forward(flow_backend=)`` overrides it for the
        posterior/flow op of one call.  The initial value is ``config.ops_backend``."""
        return self._ops_backend

    @ops_backend.setter
    def ops_backend(self, backend: str) -> None:
        backend = check_backend("RecTok", backend, "ops_backend")
        self._ops_backend = backend
        for mod in self.modules():
            if isinstance(mod, _Trunk):
                mod.ops_backend = backend
        self.noiser.backend = backend
        self.sem_criterion.backend = backend
        if self.config.ops_backend != backend:  # a copy: a config shared with another model is left alone
            self.config = dataclasses.replace(self.config, ops_backend=backend)

    @property
    def timestep_shift(self) -> float:
        """``sqrt(g·g·C/4096)`` (:func:`rectok_fast.schedules.default_shift`), the shift of the ``shift`` noise schedule."""
        return default_shift(self.grid, self.token_channels)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"img_size={c.img_size}, patch_size={c.patch_size}, channels={c.token_channels}, "
            f"teachers={list(c.teachers)}, ops_backend={self.ops_backend!r}"
        )

    # ---------------------------------------------------------------- masking

    def seed_masking(self, seed: int) -> None:
        """Seed the host RNG that draws the mask ratio (the permutation uses torch's RNG)."""
        self._mask_rng.seed(seed)

    @property
    def mask_rng_state(self) -> tuple:
        """The state of the host RNG that draws the mask ratio (``random.Random.getstate()``); assign
        a saved state to resume the same sequence of ratios (checkpoints store it)."""
        return self._mask_rng.getstate()

    @mask_rng_state.setter
    def mask_rng_state(self, state: tuple) -> None:
        self._mask_rng.setstate(state)

    def draw_num_kept(self) -> int:
        """``K = ceil(N·(1 − r))`` with ``r = max(0, U(mask_ratio_min, mask_ratio))`` (host only)."""
        c = self.config
        r = max(0.0, self._mask_rng.uniform(c.mask_ratio_min, c.mask_ratio)) if c.random_mask_ratio else c.mask_ratio
        return int(math.ceil(c.num_tokens * (1 - r)))

    def sample_mask(
        self,
        batch: int,
        device: torch.device | str | None = None,
        num_kept: int | None = None,
        *,
        generator: torch.Generator | None = None,
        mark_dynamic: bool = True,
    ) -> Mask:
        """A random masking plan: one K for the batch (``num_kept`` or :meth:`draw_num_kept`), one
        permutation per sample (``argsort(rand(B, N))``, drawn from ``generator`` when given, on
        ``device``).  The kept dim is marked dynamic for ``torch.compile`` so that a new K does not
        recompile; :meth:`Mask.rows` keeps the mark on a micro-batch's slice."""
        N = self.config.num_tokens
        K = self.draw_num_kept() if num_kept is None else int(num_kept)
        if not 1 <= K <= N:
            raise ValueError(f"RecTok.sample_mask: num_kept must be in [1, {N}], got {K}")
        device = self.latent_mean.device if device is None else device
        return random_masking(batch, N, num_kept=K, generator=generator, device=device, mark_dynamic=mark_dynamic)

    # ---------------------------------------------------------------- inference API

    def encode(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> moments (B, N, 2C) = [mean, logvar] (unclamped).

        No masking unless ``ids_keep`` (B, K) is given (then (B, K, 2C) for those tokens)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"RecTok.encode: `images` must be (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[-1] != self.config.img_size or images.shape[-2] != self.config.img_size:
            raise ValueError(f"RecTok.encode: expected {self.config.img_size}px images, got {tuple(images.shape[-2:])}")
        return self.encoder(images, ids_keep)

    @staticmethod
    def posterior_mean(moments: torch.Tensor) -> torch.Tensor:
        return moments[..., : moments.shape[-1] // 2]

    def _tokens(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 4:
            return z.flatten(2).transpose(1, 2)
        if z.dim() != 3:
            raise ValueError(f"RecTok: latents must be (B, K, C) or (B, C, g, g), got {tuple(z.shape)}")
        return z

    def decode(self, z: torch.Tensor, ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, K, C) (K < N needs ``ids_restore`` (B, N)) or (B, C, g, g) -> (B, 3, H, W), [-1, 1] scale, unclamped."""
        return self.decoder(self._tokens(z), ids_restore)

    def predict_teacher_features(
        self, z: torch.Tensor, ids_restore: torch.Tensor | None = None, teacher: str | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Semantic decoder output (B, N, teacher_width) for ``teacher`` (the only one when None;
        a dict name -> features when the model has several and ``teacher`` is None)."""
        z = self._tokens(z)
        if teacher is not None:
            if teacher not in self.sem_decoders:
                raise KeyError(f"RecTok: no semantic decoder for teacher {teacher!r}; have {list(self.sem_decoders)}")
            return self.sem_decoders[teacher](z, ids_restore)
        if len(self.sem_decoders) == 1:
            return next(iter(self.sem_decoders.values()))(z, ids_restore)
        return {name: dec(z, ids_restore) for name, dec in self.sem_decoders.items()}

    @torch.no_grad()
    def set_latent_stats(self, mean: torch.Tensor | float, std: torch.Tensor | float) -> None:
        """Per-channel (C,) (or scalar) statistics of the posterior means used by tokenize/detokenize."""
        C = self.token_channels
        for buf, v in ((self.latent_mean, mean), (self.latent_std, std)):
            v = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
            buf.copy_(v.expand(C) if v.numel() == 1 else v.reshape(C))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(…, C) -> ``(z − μ)·scale/σ``."""
        return (z - self.latent_mean.to(z)) * self.config.scale_factor / self.latent_std.to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std.to(z) / self.config.scale_factor + self.latent_mean.to(z)

    def tokenize(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> normalised latents (B, C, g, g) (posterior mean, or a sample)."""
        moments = self.encode(images)
        C = self.token_channels
        if sample:
            t = torch.zeros(images.shape[0], device=images.device, dtype=torch.float32)
            z = posterior_flow(moments, t, 0.0, sample_posterior=True, backend=self.ops_backend)[0]
        else:
            z = moments[..., :C]
        z = self.normalize(z)
        return z.transpose(1, 2).reshape(z.shape[0], C, self.grid, self.grid)

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, g, g) or (B, N, C) -> images (B, 3, H, W) in [0, 1].

        Warns (:class:`DefaultLatentStatsWarning`) while the latent statistics are still the defaults."""
        if not torch.compiler.is_compiling():
            self._warn_if_default_stats()
        return self._decode_normalised(tokens)

    def _decode_normalised(self, tokens: torch.Tensor) -> torch.Tensor:
        z = self.denormalize(self._tokens(tokens))
        return torch.clamp(self.decoder(z) * 0.5 + 0.5, 0.0, 1.0)

    def _warn_if_default_stats(self) -> None:
        """One host read per state of the stats buffers (rechecked only after they change)."""
        m, s = self.latent_mean, self.latent_std
        if m.is_meta or s.is_meta:
            return
        key = (m.data_ptr(), m._version, s.data_ptr(), s._version)
        if getattr(self, "_stats_checked", None) == key:
            return
        self._stats_checked = key
        if bool((m == 0).all()) and bool((s == 1).all()):
            warnings.warn(
                "RecTok.detokenize: the latent statistics are the defaults (mean 0, std 1), so latents of a DiT "
                "trained on normalised latents decode wrongly; compute them with `rectok-fast stats` (the released "
                "checkpoints ship none) or call set_latent_stats(mean, std)",
                DefaultLatentStatsWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self._decode_normalised(self.tokenize(images))  # the statistics cancel: no warning

    # ---------------------------------------------------------------- teachers

    def attach_teachers(self, teachers: dict[str, nn.Module]) -> None:
        """Frozen teachers (``forward(images in [-1, 1]) -> (B, N, width)``) used by the training
        forward.  They are kept outside the state dict and the parameter list."""
        for name, t in teachers.items():
            if name not in self.sem_decoders:
                raise KeyError(f"RecTok: teacher {name!r} has no semantic decoder; have {list(self.sem_decoders)}")
            want = self.config.teachers[name]
            if getattr(t, "width", want) != want:
                raise ValueError(f"RecTok: teacher {name!r} has width {t.width}, the semantic decoder predicts {want}")
            t.eval().requires_grad_(False)
        self.teachers = dict(teachers)

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each attached teacher's patch features (B, N, width), fp32."""
        return {name: t(images).float() for name, t in self.teachers.items()}

    # ---------------------------------------------------------------- training forward

    def _sem_loss(self, pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """``sem_loss`` over the tokens ``sem_target`` selects (:meth:`CosineAlignLoss.select`)."""
        c = self.config
        if c.sem_loss == "cosine":
            return self.sem_criterion(pred, target, token_mask)
        sel = self.sem_criterion.select(pred, token_mask)
        target = target.detach().float()
        err = (pred.float() - target).abs() if c.sem_loss == "l1" else (pred.float() - target).pow(2)
        per_token = err.mean(-1)
        if sel is None:
            return per_token.mean()
        w = sel.to(per_token.dtype)
        return (per_token * w).sum() / w.sum().clamp_min(1.0)

    def forward(
        self,
        images: torch.Tensor,
        mask: Mask | tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        t: torch.Tensor | None = None,
        noise: tuple[torch.Tensor, torch.Tensor] | None = None,
        seed: int | torch.Tensor | None = None,
        sample_offset: int = 0,
        flow_backend: str | None = None,
        teacher_features: dict[str, torch.Tensor] | None = None,
        return_z: bool = False,
    ) -> RecTokOutput | torch.Tensor:
        """Training: masking, posterior sample, flow interpolation, both decoders and the semantic loss.

        Args:
            images: (B, 3, H, W) in [-1, 1].
            mask: a :class:`Mask` (``ids_keep`` (B, K), ``ids_restore`` (B, N)); drawn with
                :meth:`sample_mask` when None (eager only: under ``torch.compile`` pass it in).
                ``Mask(None, None)`` disables masking.
            t: (B,) flow times (t = 1 is noise); drawn from the noise schedule by :attr:`noiser`
                (:meth:`rectok_fast.nn.FlowNoiser.draw_time`) when None, zeros when γ = 0.
            noise: ``(eps_post, eps_flow)`` each (B, K, C); in-kernel noise from a fresh device seed
                when None (under ``torch.compile`` mark their dim 1 dynamic like ``ids_keep``, or K
                specialises).  The posterior is always sampled (``z = mean + std·eps_post``, also at γ = 0).
            seed, sample_offset: instead of ``noise``, the seed of the in-kernel Philox noise and the
                global index of this batch's first sample (see :func:`rectok_fast.ops.posterior_flow`:
                a rank's slice of a global batch then draws the whole batch's numbers).
            flow_backend: ``backend`` of :func:`rectok_fast.ops.posterior_flow` for this call (None:
                :attr:`ops_backend`; the trainers' in-kernel noise mode passes ``"triton"``).
            teacher_features: name -> (B, N, width) targets; computed by the attached teachers when None.
            return_z: also compute the posterior sample ``z`` when nothing in the forward needs it
                (γ > 0 with ``sem_input_type="noisy"``: only ``z_t`` is used, and without this flag
                ``posterior_flow(return_z=False)`` neither computes nor stores z; ``out.z`` is None).

        Returns:
            :class:`RecTokOutput` in training mode; in eval mode the reconstruction from the
            posterior mean (B, 3, H, W).

        A mask drawn here (``mask=None``: ``argsort`` of random numbers, valid by construction) runs
        the forward under :func:`rectok_fast.trusted_indices`: the ops skip their eager index-value
        checks (host syncs).  A mask passed in is checked by each op unless the caller trusts it.
        """
        if not self.training:
            return self.decode(self.posterior_mean(self.encode(images)))
        trust = contextlib.nullcontext()
        if mask is None and self.config.mask_ratio > 0:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "RecTok.forward under torch.compile: draw the mask outside the compiled region and pass it "
                    "in: `model(images, mask=model.sample_mask(B, device))`"
                )
            mask = self.sample_mask(images.shape[0], images.device)
            trust = trusted_indices()
        with trust:
            return self._train_forward(
                images, mask, t, noise, seed, sample_offset, flow_backend, teacher_features, return_z
            )

    def _train_forward(
        self, images, mask, t, noise, seed, sample_offset, flow_backend, teacher_features, return_z
    ) -> RecTokOutput:
        """The training forward after the mask is settled (see :meth:`forward`)."""
        c = self.config
        B = images.shape[0]
        ids_keep, ids_restore = (None, None) if mask is None else mask
        moments = self.encode(images, ids_keep)
        flow = c.gamma > 0
        if t is None and not flow:
            t = torch.zeros(B, device=images.device)
        # z is needed by a clean semantic input, or asked for; without flow noise it is z_t (free)
        need_z = bool(return_z) or c.sem_input_type == "clean" or not flow
        z, z_t, t, kl = self.noiser(
            moments, t, noise=noise, seed=seed, sample_offset=sample_offset, backend=flow_backend, return_z=need_z
        )
        token_mask = None
        if ids_restore is not None:
            token_mask = ids_restore >= ids_keep.shape[1]
        reconstruction = self.decoder(z_t, ids_restore)

        sem_in = z_t if c.sem_input_type == "noisy" else z
        sem_pred = {name: dec(sem_in, ids_restore) for name, dec in self.sem_decoders.items()}
        if teacher_features is None and self.teachers:
            teacher_features = self.teacher_features(images)
        teacher_features = teacher_features or {}
        sem_losses = {
            name: self._sem_loss(sem_pred[name], teacher_features[name], token_mask)
            for name in sem_pred
            if name in teacher_features
        }
        sem_loss = torch.stack(list(sem_losses.values())).mean() if sem_losses else None
        return RecTokOutput(
            reconstruction=reconstruction,
            z=z,
            z_t=z_t,
            kl=kl.mean(),
            t=t if flow else None,
            sem_pred=sem_pred,
            teacher_features=teacher_features,
            sem_losses=sem_losses,
            sem_loss=sem_loss,
            ids_keep=ids_keep,
            ids_restore=ids_restore,
            token_mask=token_mask,
        )

    def freeze_all_but_decoder(self) -> None:
        """Stage 2: only the pixel decoder trains (no masking, γ = 0 is set by the recipe)."""
        self.requires_grad_(False)
        self.decoder.requires_grad_(True)

    # ---------------------------------------------------------------- loading / saving

    @classmethod
    def config_from_state_dict(cls, sd: dict[str, torch.Tensor], **overrides: Any) -> RecTokConfig:
        """Infer sizes, channels, image size and semantic decoders from parameter shapes.

        Head counts are not in the shapes: they come from the width (the official size table:
        192 → 4, 512 → 8, 768 → 12, 1024/1152/1280 → 16, otherwise head dim 64) unless given as
        ``encoder=``/``decoder=``/``sem_decoder=`` ``(width, depth, heads)`` overrides.
        """
        if "encoder.sem_cls_token_embedding" in sd:
            raise ValueError("RecTok.from_official: checkpoints with a learnable CLS token are not supported")
        if "encoder.patch_embed.0.weight" not in sd:
            raise ValueError(
                "RecTok.from_official: no `encoder.patch_embed.0.weight` in the state dict; is this a RecTok checkpoint?"
            )
        pw = sd["encoder.patch_embed.0.weight"]
        patch = int(pw.shape[-1])
        n_tok = int(sd["encoder.positional_embedding"].shape[1])
        grid = math.isqrt(n_tok)
        if grid * grid != n_tok:
            raise ValueError(f"RecTok.from_official: {n_tok} position embeddings do not form a square grid")
        C = int(sd["decoder.decoder_embed.weight"].shape[1])
        if int(sd["encoder.latent_head.weight"].shape[0]) != 2 * C:
            raise ValueError(
                "RecTok.from_official: latent_head does not output 2C moments (disable_kl models are not supported)"
            )

        def trunk(prefix: str) -> tuple[int, int, int]:
            width = int(sd[f"{prefix}.ln_pre.weight"].shape[0])
            depth = 0
            while f"{prefix}.transformer.{depth}.norm1.weight" in sd:
                depth += 1
            return width, depth, _HEADS_BY_WIDTH.get(width, max(1, width // 64))

        teachers: dict[str, int] = {}
        sem_size = None
        for key in sd:
            if key.startswith("sem_decoders.") and key.endswith(".out.weight"):
                name = key[len("sem_decoders.") : -len(".out.weight")]
                teachers[name] = int(sd[key].shape[0])
                sem_size = trunk(f"sem_decoders.{name}")
            elif key.startswith("sem_decoders.") and ".mlp." in key and ".transformer." not in key:
                raise ValueError("RecTok.from_official: MLP semantic decoders are not supported")
        cfg: dict[str, Any] = dict(
            img_size=grid * patch,
            patch_size=patch,
            token_channels=C,
            encoder=trunk("encoder"),
            decoder=trunk("decoder"),
            sem_decoder=sem_size or "tiny",
            teachers=teachers,
            qk_norm="encoder.transformer.0.attn.q_norm.weight" in sd,
        )
        cfg.update(overrides)
        return RecTokConfig(**cfg)

    @classmethod
    def from_official(
        cls,
        obj: str | os.PathLike | dict,
        use_ema: bool = True,
        *,
        trust_remote_code: bool | None = None,
        **overrides: Any,
    ) -> RecTok:
        """Load a released checkpoint: a path to the official ``.pth``, a loaded checkpoint dict
        (``{"model": …, "model_ema": …}``) or a bare state dict.  The configuration is inferred from
        the shapes (:meth:`config_from_state_dict`); frozen teacher weights
        (``sem_foundation_models.*``) are ignored.  Returns the model in eval mode on the CPU.

        A path is read with ``torch.load(weights_only=True)`` (the ``argparse.Namespace`` the
        released files pickle is allow-listed); a file needing any other global raises
        :class:`~rectok_fast.utils.checkpoint.UnsafeCheckpointError` unless ``trust_remote_code=True``
        (see :mod:`rectok_fast.models.loading`)."""
        from .loading import official_state_dict  # loading.py sits above this module (it builds RecToks)

        sd = official_state_dict(
            obj,
            use_ema=use_ema,
            what="RecTok.from_official",
            drop_prefixes=("sem_foundation_models.",),
            trust_remote_code=trust_remote_code,
        )
        cfg = cls.config_from_state_dict(sd, **overrides)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        model._reset_buffers()
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        missing = [k for k in missing if k not in ("latent_mean", "latent_std")]
        if missing or unexpected:
            raise ValueError(
                f"RecTok.from_official: state dict mismatch; missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        return model.eval()

    def _reset_buffers(self) -> None:
        """Rebuild non-persistent buffers (RoPE tables) and the stats after ``to_empty``."""
        for mod in self.modules():
            if isinstance(mod, _Trunk):
                hd = mod.transformer[0].attn.head_dim if len(mod.transformer) else 4
                mod.rope_table = rectok_rope_table(hd, self.grid, device=mod.rope_table.device)
        with torch.no_grad():
            self.latent_mean.zero_()
            self.latent_std.fill_(1.0)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (weights + latent statistics) to ``directory``."""
        save_export(directory, "rectok", asdict(self.config), self.state_dict())

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
        **overrides: Any,
    ) -> RecTok:
        """A RecTok in eval mode from, in this order of precedence:

        1. a local path: a :meth:`save_pretrained` directory, a training run directory or a checkpoint
           file (an official ``.pth``: EMA weights when ``use_ema``);
        2. a registry name: ``rectok`` or ``rectok-decft`` (the released tokenizers; see
           :data:`rectok_fast.hub.REGISTRY`);
        3. a Hugging Face hub repository id (``filename=``, ``revision=``): one of our exports
           (``config.json`` + ``model.safetensors``) or a file in it; ``QingyuShi/RecTok`` alone is
           ``RecTok.pth``.

        Hub files go through the ``huggingface_hub`` cache (``cache_dir`` or ``HF_HUB_CACHE``;
        ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``: the cache only).  Checkpoints are read with
        ``weights_only=True`` (:mod:`rectok_fast.models.loading`; ``trust_remote_code`` is the opt-in).
        ``device`` / ``dtype``: where and in what precision the model ends up; ``overrides`` replace
        configuration fields (exports and checkpoint files).  The released files hold no latent
        statistics: set them (``rectok-fast stats``, :meth:`set_latent_stats`) before generating::

            tok = RecTok.from_pretrained("rectok-decft", device="cuda")
        """
        from ..hub import load_pretrained

        def load_export(path: str) -> RecTok:
            from safetensors.torch import load_file

            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f)
            cfg_type = cfg.pop("model_type", "rectok")
            if cfg_type != "rectok":
                from ..errors import CheckpointError

                raise CheckpointError(f"RecTok.from_pretrained: {path} holds a {cfg_type!r} model, not a RecTok")
            for key in ("encoder", "decoder", "sem_decoder"):
                if isinstance(cfg.get(key), list):
                    cfg[key] = tuple(cfg[key])
            model = cls(RecTokConfig(**{**cfg, **overrides}))
            model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
            return model

        return load_pretrained(
            cls,
            "tokenizer",
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


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def rectok(size: str = "base", **kwargs: Any) -> RecTok:
    """A fresh RecTok with encoder and pixel decoder of one named size (``tiny`` … ``large``)."""
    return RecTok(RecTokConfig(encoder=size, decoder=size, **kwargs))


RECTOK_MODELS = {
    "RecTok-T": lambda **kw: rectok("tiny", **kw),
    "RecTok-S": lambda **kw: rectok("small", **kw),
    "RecTok-B": lambda **kw: rectok("base", **kw),
    "RecTok-L": lambda **kw: rectok("large", **kw),
    "rectok_BB": lambda **kw: rectok("base", **kw),
}
