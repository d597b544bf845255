"""Drop-in nn.Modules over the fused ops, for RecTok and other latent tokenizers (VA-VAE, l-DeTok, REPA-E, MAETok).

Each module is a thin stateful wrapper: the math lives in :mod:`rectok_fast.ops`, so the module
runs the Triton kernels on CUDA tensors and the PyTorch reference elsewhere (``backend`` argument;
:func:`rectok_fast.last_backend` says which path ran).  Constructors validate their arguments and
raise ``ValueError``/``TypeError`` naming the bad one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from .. import ops
from .._backend import BACKENDS_TRITON, record
from .._validate import check_real
from ..ops.flow_matching import velocity_cosine_loss
from ..schedules import TOKENIZER_SCHEDULES, sample_time

SEMANTIC_TARGETS = ("rec+align", "reconstruction", "align")  # which tokens the semantic loss scores
NOISE_MODES = ("interpolate", "additive")  # FlowNoiser(mode=...)
COSINE_FORMS = ("one_minus_cos", "neg_cos")  # CosineAlignLoss(form=...)
FM_TIMES = ("rectok", "sit")  # FlowMatchingLoss(time=...)
FM_PATHS = ("linear", "cosine")  # FlowMatchingLoss(path=...)


# ----------------------------------------------------------------------------- argument checks


def check_backend(owner: str, backend: object, name: str = "backend") -> str:
    if backend not in BACKENDS_TRITON:
        raise ValueError(f"{owner}: `{name}` must be one of {BACKENDS_TRITON}, got {backend!r}")
    return backend


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: `{name}` must be one of {choices}, got {value!r}")
    return value


def check_float(owner: str, name: str, value: object, *, lo: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float (``> lo`` when ``strict``, else ``>= lo``)."""
    value = check_real(owner, name, value)
    bad = not math.isfinite(value) or (lo is not None and (value <= lo if strict else value < lo))
    if bad:
        rel = "" if lo is None else (f" and > {lo}" if strict else f" and >= {lo}")
        raise ValueError(f"{owner}: `{name}` must be finite{rel}, got {value}")
    return value


def check_int(owner: str, name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: `{name}` must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{owner}: `{name}` must be >= {lo}, got {value}")
    return value


def check_bool(owner: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: `{name}` must be a bool, got {type(value).__name__}")
    return value


def check_dim(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: `{name}` must be an int, got {type(value).__name__}")
    if value == 0:
        raise ValueError(f"{owner}: `{name}` cannot be the batch axis 0")
    return value


# ----------------------------------------------------------------------------- layouts


def tokens_last(x: torch.Tensor, dim: int, owner: str, name: str) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """(B, ..., D, ...) with the feature axis at ``dim`` -> ``(tokens (B, N, D), spatial, d)`` with N the
    product of the other non-batch axes ``spatial``; a view whenever the layout allows (channels-first
    (B, D, H, W) with ``dim=1`` is one).  (B, N, D) with ``dim=-1`` is returned as it is."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{owner}: `{name}` must have rank >= 2 (B, ..., D), got shape {tuple(x.shape)}")
    d = dim % x.dim() if -x.dim() <= dim < x.dim() else None
    if d is None or d == 0:
        raise ValueError(f"{owner}: feature dim {dim} is not a non-batch axis of `{name}` {tuple(x.shape)}")
    if x.dim() == 3 and d == 2:
        return x, (x.shape[1],), d
    x = x.movedim(d, -1)
    spatial = tuple(x.shape[1:-1])
    return (x.unsqueeze(1) if x.dim() == 2 else x.flatten(1, -2)), spatial, d


def tokens_back(y: torch.Tensor, spatial: tuple[int, ...], d: int) -> torch.Tensor:
    """Inverse of :func:`tokens_last` for a (B, N, D') result: back to the layout (a view)."""
    if y.dim() == 3 and d == 2 and len(spatial) == 1:
        return y
    return y.reshape(y.shape[0], *spatial, y.shape[-1]).movedim(-1, d)


# ----------------------------------------------------------------------------- FlowNoiser


class FlowNoiserOutput(NamedTuple):
    z: torch.Tensor | None  # (B, N, C) posterior sample (or mean, or the latent), input layout; None: return_z=False
    z_t: torch.Tensor  # (B, N, C) noised latent (``z`` itself when no flow noise is added)
    t: torch.Tensor | None  # (B,) fp32 flow times (None when no time was used)
    kl: torch.Tensor | None  # (B,) fp32 per-sample KL to N(0, I) (None for a deterministic latent)


class FlowNoiser(nn.Module):
    """Posterior sampling + latent noising + KL in one fused pass (:func:`rectok_fast.ops.posterior_flow`; t = 1 is noise).

    ``forward(moments, t=None)`` takes the encoder output — moments ``mean ‖ logvar`` along ``dim``
    ((B, N, 2C), or (B, 2C, H, W) with ``dim=1``), or with ``posterior=False`` a deterministic
    latent z (B, N, C) — and returns :class:`FlowNoiserOutput` ``(z, z_t, t, kl)``:

    * ``mode="interpolate"`` (RecTok, l-DeTok): ``z_t = (1 − t)·z + t·γ·ε``;
    * ``mode="additive"``: ``z_t = z + t·γ·ε`` (computed from the fused op's output as
      ``z_t_interp + t·z`` in fp32: the same value up to rounding, the same gradients);
    * ``gamma=0``: no flow noise and no time draw: ``z_t`` *is* ``z`` and ``t`` is whatever was passed
      (None by default).  ``z = mean + std·ε_post`` is still a posterior sample in training.

    ``t`` is drawn per sample with :meth:`draw_time` when not given (``schedule``; ``"shift"`` uses
    ``shift`` or ``s = sqrt(N_full·C/4096)`` with ``N_full`` the **full** token grid given at
    construction as ``grid`` (g, or (h, w)) or ``num_tokens`` — not the K tokens a masked encoder
    passes in).  The noise is generated in-kernel from ``seed`` (drawn on the device unless given), so
    no (B, N, C) noise tensor is stored for backward; or pass it as ``noise``.  In eval mode the
    posterior mean is used and no flow noise is added unless ``noise_in_eval``.  With
    ``posterior=False`` the latent is concatenated with zeros (logvar 0, never sampled) into the
    op's (B, N, 2C) input: one extra copy of z, no KL (``kl`` is None).  RecTok's training
    forward runs through this module.

    Example (l-DeTok: deterministic latent, interpolative noise with γ = 3, masked encoder)::

        noiser = FlowNoiser(gamma=3.0, schedule="uniform", posterior=False)
        z_t = noiser(encoder(x_visible)).z_t     # (1 − t)·z + t·3·ε, t ~ U(0, 1) per image
    """

    def __init__(
        self,
        gamma: float = 1.0,
        schedule: str = "shift",
        shift: float | None = None,
        sample_posterior: bool = True,
        noise_in_eval: bool = False,
        backend: str = "auto",
        *,
        mode: str = "interpolate",
        grid: int | tuple[int, int] | None = None,
        num_tokens: int | None = None,
        posterior: bool = True,
        dim: int = -1,
    ):
        super().__init__()
        own = "FlowNoiser"
        self.gamma = check_float(own, "gamma", gamma, lo=0.0)
        self.schedule = check_choice(own, "schedule", schedule, TOKENIZER_SCHEDULES)
        self.shift = None if shift is None else check_float(own, "shift", shift, lo=0.0, strict=True)
        self.sample_posterior = check_bool(own, "sample_posterior", sample_posterior)
        self.noise_in_eval = check_bool(own, "noise_in_eval", noise_in_eval)
        self.backend = check_backend(own, backend)
        self.mode = check_choice(own, "mode", mode, NOISE_MODES)
        self.posterior = check_bool(own, "posterior", posterior)
        self.dim = check_dim(own, "dim", dim)
        if grid is not None and num_tokens is not None:
            raise ValueError(f"{own}: pass `grid` or `num_tokens`, not both")
        if grid is not None:
            if isinstance(grid, (tuple, list)):
                if len(grid) != 2:
                    raise ValueError(f"{own}: `grid` must be an int g or a pair (h, w), got {grid!r}")
                num_tokens = check_int(own, "grid[0]", grid[0], 1) * check_int(own, "grid[1]", grid[1], 1)
            else:
                num_tokens = check_int(own, "grid", grid, 1) ** 2
        self.num_tokens = None if num_tokens is None else check_int(own, "num_tokens", num_tokens, 1)
        if self.gamma > 0 and self.schedule == "shift" and self.shift is None and self.num_tokens is None:
            raise ValueError(
                f"{own}: schedule='shift' needs `shift`, or the full token grid as `grid`/`num_tokens` "
                "(s = sqrt(N·C/4096) over all N tokens, not the K a masked encoder passes in)"
            )

    def draw_time(
        self,
        batch: int,
        *,
        grid: int | None = None,
        channels: int | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(batch,) fp32 flow times of this module's schedule (:func:`rectok_fast.schedules.sample_time`).

        The ``shift`` schedule uses ``shift``, else ``sqrt(N·channels/4096)`` with N = ``grid``² when
        given here, else the construction's full ``num_tokens``."""
        shift = self.shift
        if self.schedule == "shift" and shift is None:
            if channels is None:
                raise ValueError("FlowNoiser.draw_time: the default shift needs `channels`")
            n = grid * grid if grid is not None else self.num_tokens
            if n is None:
                raise ValueError(
                    "FlowNoiser.draw_time: the default shift needs `grid` (or `num_tokens` at construction)"
                )
            shift = math.sqrt(n * channels / 4096)
        return sample_time(batch, self.schedule, shift=shift, device=device, generator=generator)

    def _noise(self, noise, spatial_of):
        if noise is None:
            return None
        if isinstance(noise, torch.Tensor):  # one tensor: the flow noise of a deterministic latent
            if self.posterior:
                raise TypeError("FlowNoiser: `noise` must be a pair (eps_post, eps_flow) for moments")
            noise = (noise, noise)  # eps_post is unused: z = the latent
        if not isinstance(noise, (tuple, list)) or len(noise) != 2:
            raise TypeError("FlowNoiser: `noise` must be a pair (eps_post, eps_flow) or one tensor eps_flow")
        return tuple(spatial_of(e, f"noise[{i}]") for i, e in enumerate(noise))

    def forward(
        self,
        moments: torch.Tensor,
        t: torch.Tensor | None = None,
        *,
        noise: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None,
        seed: int | torch.Tensor | None = None,
        sample_offset: int = 0,
        generator: torch.Generator | None = None,
        backend: str | None = None,
        return_z: bool = True,
    ) -> FlowNoiserOutput:
        """moments (B, N, 2C) (layout per ``dim``; a latent (B, N, C) with ``posterior=False``) -> :class:`FlowNoiserOutput`.

        Args:
            t: (B,) flow times; None draws them (training / ``noise_in_eval``, γ > 0) with
                ``generator`` (torch's default when None).
            noise: explicit ``(eps_post, eps_flow)``, each shaped like z, instead of in-kernel noise
                (with ``posterior=False`` one tensor, the flow noise, is enough).
            seed: the in-kernel Philox seed (int or 1-element int64 tensor); with neither ``noise``
                nor ``seed`` a fresh one is drawn on the device (:func:`rectok_fast.ops.posterior_flow`).
            sample_offset: global index of this batch's first sample (a rank's slice of a global batch
                then draws that batch's numbers; seeded Triton path only).
            backend: overrides the module's ``backend`` for this call.
            return_z: when False the output's ``z`` is None and, when flow noise is added in
                ``mode="interpolate"``, nothing is computed or stored for it (``return_z=False`` of
                :func:`rectok_fast.ops.posterior_flow`); without flow noise ``z`` *is* ``z_t``.
        """
        own = "FlowNoiser"
        backend = self.backend if backend is None else check_backend(own, backend)
        return_z = check_bool(own, "return_z", return_z)
        x, spatial, d = tokens_last(moments, self.dim, own, "moments")

        def as_tokens(e, name):
            return tokens_last(e, self.dim, own, name)[0]

        noise = self._noise(noise, as_tokens)
        noisy = (self.training or self.noise_in_eval) and self.gamma > 0
        if not self.posterior:  # a deterministic latent: mean = z, logvar = 0, never sampled
            if not noisy:
                return FlowNoiserOutput(moments if return_z else None, moments, t, None)
            x = torch.cat([x, torch.zeros_like(x)], -1)
        B = x.shape[0]
        C = x.shape[-1] // 2
        sample = self.sample_posterior and self.training and self.posterior
        if not noisy:
            zeros = torch.zeros(B, device=x.device)
            z, _, kl = ops.posterior_flow(
                x,
                zeros,
                0.0,
                noise=noise,
                seed=seed,
                sample_offset=sample_offset,
                sample_posterior=sample,
                backend=backend,
            )
            z = tokens_back(z, spatial, d)
            return FlowNoiserOutput(z if return_z else None, z, t, kl if self.posterior else None)
        if t is None:
            t = self.draw_time(B, channels=C, device=x.device, generator=generator)
        z, z_t, kl = ops.posterior_flow(
            x,
            t,
            self.gamma,
            noise=noise,
            seed=seed,
            sample_offset=sample_offset,
            sample_posterior=sample,
            return_z=return_z or self.mode == "additive",
            backend=backend,
        )
        if self.mode == "additive":  # z + t·γ·ε = [(1 − t)·z + t·γ·ε] + t·z
            acc = torch.promote_types(z.dtype, torch.float32)
            tt = t.reshape(-1, 1, 1).to(acc)
            z_t = (z_t.to(acc) + tt * z.to(acc)).to(z.dtype)
        z = tokens_back(z, spatial, d) if return_z else None
        return FlowNoiserOutput(z, tokens_back(z_t, spatial, d), t, kl if self.posterior else None)

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, mode={self.mode!r}, schedule={self.schedule!r}, shift={self.shift}, "
            f"num_tokens={self.num_tokens}, posterior={self.posterior}, dim={self.dim}, backend={self.backend!r}"
        )


# ----------------------------------------------------------------------------- CosineAlignLoss


class CosineAlignLoss(nn.Module):
    """Feature alignment / masked-feature reconstruction: mean over the scored tokens of
    ``relu(1 − cos(pred, target) − margin)`` (``form="one_minus_cos"``, RecTok / VA-VAE's marginal
    cosine term) or ``−cos(pred, target)`` (``form="neg_cos"``, REPA / REPA-E's projection loss: the
    same gradient, the value lower by exactly 1; needs ``margin=0``).

    ``forward(pred, target, token_mask=None)``: pred, target (B, N, D), or any layout with the feature
    axis at ``dim`` / ``target_dim`` (channels-first (B, D, H, W) latents: ``dim=1``); both flatten to
    the same (B, N, D).  ``pred``/``target`` may also be equal-length lists (one pair per encoder, D may
    differ): the loss is the mean of the per-encoder losses (REPA with several encoders).
    ``token_mask`` (B, N) bool (or the spatial shape), True where the token was *masked* in the
    encoder; ``target`` selects the tokens (:meth:`select`): ``"rec+align"`` all, ``"reconstruction"``
    masked only (0 when none is), ``"align"`` visible only.  The target features get no gradient
    unless ``grad_target`` (a trainable projection on the teacher side).  ``cos`` divides by each norm
    clamped to 1e-8 (``F.normalize`` clamps at 1e-12: the same except for near-zero vectors).
    RecTok's semantic loss runs through this module.

    Example (REPA: ``−mean cos`` over the tokens of the projected DiT features, two encoders)::

        repa = CosineAlignLoss(form="neg_cos")
        proj_loss = repa([proj1(h), proj2(h)], [dinov2_tokens, clip_tokens])
    """

    def __init__(
        self,
        target: str = "rec+align",
        margin: float = 0.0,
        backend: str = "auto",
        *,
        form: str = "one_minus_cos",
        dim: int = -1,
        target_dim: int = -1,
        grad_target: bool = False,
    ):
        super().__init__()
        own = "CosineAlignLoss"
        self.target = check_choice(own, "target", target, SEMANTIC_TARGETS)
        self.margin = check_float(own, "margin", margin)
        self.backend = check_backend(own, backend)
        self.form = check_choice(own, "form", form, COSINE_FORMS)
        if self.form == "neg_cos" and self.margin != 0.0:
            raise ValueError(f"{own}: `margin` must be 0 with form='neg_cos' (−cos has no margin), got {margin}")
        self.dim = check_dim(own, "dim", dim)
        self.target_dim = check_dim(own, "target_dim", target_dim)
        self.grad_target = check_bool(own, "grad_target", grad_target)

    def select(self, pred: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The (B, N) bool tokens that ``target`` scores for ``pred`` (B, N, D), or None for all."""
        if self.target == "reconstruction":
            if token_mask is None:
                return torch.zeros(pred.shape[:-1], dtype=torch.bool, device=pred.device)
            return token_mask
        if self.target == "align" and token_mask is not None:
            return ~token_mask.bool()
        return None

    def _one(self, pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        own = "CosineAlignLoss"
        p = tokens_last(pred, self.dim, own, "pred")[0]
        t = tokens_last(target, self.target_dim, own, "target")[0]
        if token_mask is not None and token_mask.shape != p.shape[:-1]:
            if token_mask.dim() < 1 or token_mask.numel() != p.shape[0] * p.shape[1]:
                raise ValueError(
                    f"{own}: `token_mask` must have shape {tuple(p.shape[:-1])} (B, N), got {tuple(token_mask.shape)}"
                )
            token_mask = token_mask.reshape(p.shape[:-1])
        sel = self.select(p, token_mask)
        loss = ops.cosine_align_loss(p, t, sel, self.margin, grad_target=self.grad_target, backend=self.backend)
        if self.form == "neg_cos":  # −mean cos = mean(1 − cos) − 1 (0 when no token is scored, like the 1 − cos form)
            loss = loss - (1.0 if sel is None else sel.any().to(loss.dtype))
        return loss

    def forward(
        self,
        pred: torch.Tensor | Sequence[torch.Tensor],
        target: torch.Tensor | Sequence[torch.Tensor],
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """0-dim fp32 loss (the mean over encoders when given lists)."""
        if isinstance(pred, (list, tuple)) or isinstance(target, (list, tuple)):
            if not (isinstance(pred, (list, tuple)) and isinstance(target, (list, tuple))) or len(pred) != len(target):
                raise ValueError(
                    "CosineAlignLoss: `pred` and `target` must be lists of the same length (one per encoder)"
                )
            if not pred:
                raise ValueError("CosineAlignLoss: `pred` is an empty list")
            return torch.stack([self._one(p, t, token_mask) for p, t in zip(pred, target)]).mean()
        return self._one(pred, target, token_mask)

    def extra_repr(self) -> str:
        return (
            f"target={self.target!r}, form={self.form!r}, margin={self.margin}, dim={self.dim}, "
            f"target_dim={self.target_dim}, grad_target={self.grad_target}, backend={self.backend!r}"
        )


# ----------------------------------------------------------------------------- KLAlignLoss


class KLAlignLoss(nn.Module):
    """Distribution-level alternative to :class:`CosineAlignLoss`: ``T²·KL(softmax(t/T) ‖ softmax(s/T))``
    over the feature dim, averaged over tokens.  ``forward(student, teacher, mask=None)``."""

    def __init__(self, temperature: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.temperature = check_float("KLAlignLoss", "temperature", temperature, lo=0.0, strict=True)
        self.backend = check_backend("KLAlignLoss", backend)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return ops.kl_align_loss(student, teacher, self.temperature, mask, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"


# ----------------------------------------------------------------------------- masking modules


class MaskTokenRestore(nn.Module):
    """MAE-style decoder input: K visible tokens + learned mask tokens, reordered by ``ids_restore``,
    plus an optional (learned) position embedding, in one fused pass.

    * ``forward(visible (B, K, D), ids_restore (B, N)) -> (B, N, D)``; ``ids_restore=None`` is the
      unmasked path (``visible`` is then (B, N, D) and only the position embedding is added).
    * ``replace(x (B, N, D), token_mask (B, N)) -> (B, N, D)``: MAETok-style encoders that keep all N
      tokens and overwrite the masked ones: ``where(token_mask, mask_token, x) (+ pos)`` (out of place,
      so autograd sees it; the mask token gets the sum of the masked rows' gradients).

    With ``num_tokens`` given the module owns a (1, N, D) ``positional_embedding``; ``mask_token`` is
    (1, 1, D).  The plans come from :func:`rectok_fast.masking.random_masking`.

    Example (a MAETok / l-DeTok decoder)::

        restore = MaskTokenRestore(dim=768, num_tokens=256)
        x = restore(decoder_embed(latents_visible), mask.ids_restore)
    """

    def __init__(self, dim: int, num_tokens: int | None = None, init_std: float = 0.02, backend: str = "auto"):
        super().__init__()
        own = "MaskTokenRestore"
        dim = check_int(own, "dim", dim, 1)
        if num_tokens is not None:
            num_tokens = check_int(own, "num_tokens", num_tokens, 1)
        init_std = check_float(own, "init_std", init_std, lo=0.0)
        self.backend = check_backend(own, backend)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_embedding = nn.Parameter(torch.zeros(1, num_tokens, dim)) if num_tokens else None
        if init_std > 0:
            nn.init.normal_(self.mask_token, std=init_std)
            if self.positional_embedding is not None:
                nn.init.normal_(self.positional_embedding, std=init_std)

    def _check_full(self, name: str, x: torch.Tensor) -> None:
        D = self.mask_token.shape[-1]
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != D:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MaskTokenRestore: `{name}` must be (B, N, {D}), got {shape}")
        if self.positional_embedding is not None and x.shape[1] != self.positional_embedding.shape[1]:
            raise ValueError(
                f"MaskTokenRestore: `{name}` has {x.shape[1]} tokens, the position embedding "
                f"{self.positional_embedding.shape[1]}"
            )

    def forward(self, visible: torch.Tensor, ids_restore: torch.Tensor | None = None) -> torch.Tensor:
        if ids_restore is None:
            self._check_full("visible", visible)
            pos = self.positional_embedding
            return visible if pos is None else visible + pos
        return ops.restore_tokens(
            visible, ids_restore, self.mask_token, self.positional_embedding, backend=self.backend
        )

    def replace(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, N, D), token_mask (B, N) bool (True = masked; None = nothing masked) -> (B, N, D)."""
        self._check_full("x", x)
        if token_mask is not None:
            if not isinstance(token_mask, torch.Tensor) or token_mask.dtype != torch.bool:
                raise TypeError("MaskTokenRestore.replace: `token_mask` must be a bool tensor")
            if token_mask.shape != x.shape[:2]:
                raise ValueError(
                    f"MaskTokenRestore.replace: `token_mask` must have shape {tuple(x.shape[:2])}, "
                    f"got {tuple(token_mask.shape)}"
                )
            x = torch.where(token_mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        pos = self.positional_embedding
        return x if pos is None else x + pos

    def extra_repr(self) -> str:
        n = None if self.positional_embedding is None else self.positional_embedding.shape[1]
        return f"dim={self.mask_token.shape[-1]}, num_tokens={n}, backend={self.backend!r}"


class TokenGather(nn.Module):
    """``x[b, ids_keep[b]] (+ pos[ids_keep[b]])`` — keep the visible tokens (and their position rows)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend("TokenGather", backend)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), ids_keep (B, K) (None: every token, ``x + pos``) -> (B, K, D)."""
        if ids_keep is None:
            return x if pos is None else x + pos.reshape(1, *pos.shape[-2:])
        return ops.gather_tokens(x, ids_keep, pos, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


# ----------------------------------------------------------------------------- FlowMatchingLoss


def _seeded_randn(x: torch.Tensor, seed) -> torch.Tensor:
    """The reference paths' noise for ``seed``: ``torch.randn`` from a ``torch.Generator`` seeded with it
    (the stream :func:`rectok_fast.ops.flow_matching_xt`'s reference path uses; a tensor seed is read
    back to the host once)."""
    s = int(seed.reshape(-1)[0].item()) if isinstance(seed, torch.Tensor) else int(seed)
    g = torch.Generator(device=x.device)
    g.manual_seed(s % 2**64)
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=g)


class FlowMatchingLoss(nn.Module):
    """The velocity flow-matching loss of a latent DiT / SiT, with in-kernel noise on the linear path.

    ``x_t = fm.xt(x, t, seed)`` builds the model input; ``loss = fm(pred, x, t, seed)`` regenerates
    the same noise ε from ``seed`` (or takes it as ``noise``) and returns ``mean((pred − v)²)`` (fp32).
    ``x`` is always the data.  The conventions (α, σ the data and noise coefficients, v = dx_t/dt):

    ===================  ==============================  ===========================================
    ``time`` / ``path``  ``x_t``                         target ``v``
    ===================  ==============================  ===========================================
    rectok / linear      ``t·x + (1 − t)·ε`` (t=1 data)  ``x − ε``
    sit / linear         ``(1 − t)·x + t·ε`` (t=0 data)  ``ε − x``  (SiT, REPA, REPA-E)
    rectok / cosine      ``sin(πt/2)·x + cos(πt/2)·ε``   ``(π/2)·(cos(πt/2)·x − sin(πt/2)·ε)``
    sit / cosine         ``cos(πt/2)·x + sin(πt/2)·ε``   ``(π/2)·(cos(πt/2)·ε − sin(πt/2)·x)``  (REPA)
    ===================  ==============================  ===========================================

    ``time="sit"`` on the linear path maps onto the fused op: ``x_t = op_xt(x, 1 − t)`` (the op's
    noise coefficient is then ``1 − (1 − t)``, which equals t up to one rounding, ≤ 2⁻²⁴ in fp32) and
    ``loss = op_loss(−pred, x)`` (``(pred − (ε − x))² = (−pred − (x − ε))²`` holds bit for bit in
    floating point; one negated copy of ``pred``).  ``path="cosine"`` has no fused kernel: it runs the
    PyTorch formula above (recorded as the ``"reference"`` path of ``flow_matching_xt`` / ``flow_matching_loss`` in
    :func:`rectok_fast.last_backend`) under ``backend="auto"``/``"reference"`` and raises under
    ``"triton"``; its seeded noise is ``torch.randn`` from a ``torch.Generator`` seeded with ``seed``.

    ``cosine_weight`` (LightningDiT's ``use_cosine_loss``; 0 by default) adds
    ``cosine_weight · mean over (b, spatial) of (1 − cos(pred, v))``, cos over the channel dim 1 of
    (B, C, ...) inputs as ``F.cosine_similarity(dim=1, eps=1e-8)``; on the linear path it is fused in
    ``ops.flow_matching_loss(cosine_weight=)`` (v from the regenerated noise, x0 never stored).

    Example (SiT / REPA convention)::

        fm = FlowMatchingLoss(time="sit")
        loss = fm(model(fm.xt(x, t, seed), t, y), x, t, seed)
    """

    def __init__(
        self, backend: str = "auto", *, time: str = "rectok", path: str = "linear", cosine_weight: float = 0.0
    ):
        super().__init__()
        own = "FlowMatchingLoss"
        self.backend = check_backend(own, backend)
        self.time = check_choice(own, "time", time, FM_TIMES)
        self.path = check_choice(own, "path", path, FM_PATHS)
        if isinstance(cosine_weight, bool) or not isinstance(cosine_weight, (int, float)):
            raise ValueError(f"{own}: `cosine_weight` must be a python float, got {cosine_weight!r}")
        if not math.isfinite(cosine_weight):
            raise ValueError(f"{own}: `cosine_weight` must be finite, got {cosine_weight!r}")
        self.cosine_weight = float(cosine_weight)

    def _args(self, op: str, seed, noise, sample_offset, backend):
        backend = self.backend if backend is None else check_backend("FlowMatchingLoss", backend)
        if seed is None and noise is None:
            raise ValueError(f"FlowMatchingLoss.{op}: pass `seed` (or `noise`), the same to xt and to the loss")
        if self.path == "cosine":
            if backend == "triton":
                raise ValueError(
                    "FlowMatchingLoss: path='cosine' has no fused kernel; use backend='auto' or 'reference'"
                )
            if sample_offset != 0:
                raise ValueError("FlowMatchingLoss: `sample_offset` needs the seeded Triton stream (path='linear')")
        return backend

    def _cosine(self, x: torch.Tensor, t: torch.Tensor, seed, noise) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, v) of the cosine path, in fp32 (x's dtype when fp64)."""
        acc = torch.promote_types(x.dtype, torch.float32)
        eps = (noise if noise is not None else _seeded_randn(x, seed)).to(acc)
        a = (0.5 * math.pi) * t.reshape(-1, *([1] * (x.dim() - 1))).to(acc)
        c, s = torch.cos(a), torch.sin(a)
        xf, k = x.to(acc), 0.5 * math.pi
        if self.time == "sit":
            return c * xf + s * eps, k * (c * eps - s * xf)
        return s * xf + c * eps, k * (c * xf - s * eps)

    def xt(
        self,
        x1: torch.Tensor,
        t: torch.Tensor,
        seed: int | torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        sample_offset: int = 0,
        backend: str | None = None,
    ) -> torch.Tensor:
        """x1 (B, ...) data, t (B,) -> the model input x_t (B, ...) in x1's dtype (table above)."""
        backend = self._args("xt", seed, noise, sample_offset, backend)
        if self.path == "cosine":
            record("flow_matching_xt", "reference")
            return self._cosine(x1, t, seed, noise)[0].to(x1.dtype)
        tt = 1 - t if self.time == "sit" else t
        return ops.flow_matching_xt(x1, tt, noise=noise, seed=seed, sample_offset=sample_offset, backend=backend)

    def target(self, x1: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity target v (B, ...) for an explicit ``noise`` (table above), fp32 (a reference helper)."""
        if self.path == "cosine":
            return self._cosine(x1, t, None, noise)[1]
        acc = torch.promote_types(x1.dtype, torch.float32)
        v = x1.to(acc) - noise.to(acc)
        return -v if self.time == "sit" else v

    def forward(
        self,
        pred: torch.Tensor,
        x1: torch.Tensor,
        t: torch.Tensor,
        seed: int | torch.Tensor | None = None,
        *,
        noise: torch.Tensor | None = None,
        sample_offset: int = 0,
        backend: str | None = None,
    ) -> torch.Tensor:
        """pred, x1 (B, ...), t (B,) -> ``mean((pred − v)²)`` 0-dim fp32; pass the seed/noise used for x_t."""
        backend = self._args("forward", seed, noise, sample_offset, backend)
        if self.path == "cosine":
            record("flow_matching_loss", "reference")
            if pred.shape != x1.shape:
                raise ValueError(
                    f"FlowMatchingLoss: `pred` must have the shape of `x1` {tuple(x1.shape)}, got {tuple(pred.shape)}"
                )
            v = self._cosine(x1, t, seed, noise)[1]
            loss = (pred.to(v.dtype) - v).pow(2).mean()  # fp32 (fp64 for fp64 inputs)
            if self.cosine_weight:
                if pred.dim() < 2:
                    raise ValueError("FlowMatchingLoss: the cosine term needs a channel dim: (B, C, ...) inputs")
                loss = loss + self.cosine_weight * velocity_cosine_loss(pred.to(v.dtype), v)
            return loss
        kw = {"noise": noise, "seed": seed, "sample_offset": sample_offset, "backend": backend}
        if self.cosine_weight:
            kw["cosine_weight"] = self.cosine_weight
        if self.time == "sit":  # (pred − (ε − x))² = (−pred − (x − ε))², cos(pred, ε − x) = cos(−pred, x − ε)
            return ops.flow_matching_loss(-pred, x1, 1 - t, **kw)
        return ops.flow_matching_loss(pred, x1, t, **kw)

    def extra_repr(self) -> str:
        cw = f", cosine_weight={self.cosine_weight!r}" if self.cosine_weight else ""
        return f"time={self.time!r}, path={self.path!r}{cw}, backend={self.backend!r}"
