"""Drop-in nn.Modules over the fused ops, for RecTok and other latent tokenizers (VA-VAE, l-DeTok, REPA-E, MAETok).

Each module is a thin stateful wrapper: the math lives in :mod:`rectok_fast.ops`, so the module
runs the Triton kernels on CUDA tensors and the PyTorch reference elsewhere (``backend`` argument).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from .. import ops
from ..schedules import TOKENIZER_SCHEDULES, sample_time

SEMANTIC_TARGETS = ("rec+align", "reconstruction", "align")  # which tokens the semantic loss scores


class FlowNoiserOutput(NamedTuple):
    z: torch.Tensor  # (B, N, C) posterior sample (or mean)
    z_t: torch.Tensor  # (B, N, C) flow input (1 - t)·z + t·γ·ε
    t: torch.Tensor  # (B,) fp32 flow times
    kl: torch.Tensor  # (B,) fp32 per-sample KL to N(0, I)


class FlowNoiser(nn.Module):
    """Posterior sampling + forward-flow interpolation + KL in one fused pass (RecTok §2; t = 1 is noise).

    ``forward(moments, t=None)`` takes the encoder's (B, N, 2C) output (mean ‖ logvar); when ``t``
    is None it draws one time per sample with :meth:`draw_time` (``schedule``; ``"shift"`` uses
    ``shift`` or s = sqrt(g²·C/4096) with g² = N).  The noise is generated in-kernel from a seed
    (drawn on the device unless given), so no B·N·C noise tensor is stored for backward; or pass it
    as ``noise``.  In eval mode the posterior mean is used and no flow noise is added unless
    ``noise_in_eval``.  RecTok's training forward runs through this module.

    Example (VA-VAE / l-DeTok style encoder head)::

        noiser = FlowNoiser(gamma=1.0, schedule="shift")
        out = noiser(encoder(x))            # out.z_t goes to the decoders, out.kl.mean() to the loss
    """

    def __init__(
        self,
        gamma: float = 1.0,
        schedule: str = "shift",
        shift: float | None = None,
        sample_posterior: bool = True,
        noise_in_eval: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if schedule not in TOKENIZER_SCHEDULES:
            raise ValueError(f"FlowNoiser: `schedule` must be one of {TOKENIZER_SCHEDULES}, got {schedule!r}")
        self.gamma, self.schedule, self.shift = gamma, schedule, shift
        self.sample_posterior, self.noise_in_eval, self.backend = sample_posterior, noise_in_eval, backend

    def draw_time(
        self,
        batch: int,
        *,
        grid: int | None = None,
        channels: int | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(batch,) fp32 flow times of this module's schedule (:func:`rectok_fast.schedules.sample_time`);
        ``grid``/``channels`` give the default shift when ``shift`` is None."""
        return sample_time(
            batch, self.schedule, shift=self.shift, grid=grid, channels=channels, device=device, generator=generator
        )

    def forward(
        self,
        moments: torch.Tensor,
        t: torch.Tensor | None = None,
        *,
        noise: tuple[torch.Tensor, torch.Tensor] | None = None,
        seed: int | torch.Tensor | None = None,
        sample_offset: int = 0,
        backend: str | None = None,
    ) -> FlowNoiserOutput:
        """moments (B, N, 2C) -> :class:`FlowNoiserOutput`.

        Args:
            t: (B,) flow times; None draws them (training / ``noise_in_eval``) or uses 0 (eval).
            noise: explicit ``(eps_post, eps_flow)``, each (B, N, C), instead of in-kernel noise.
            seed: the in-kernel Philox seed (int or 1-element int64 tensor); with neither ``noise``
                nor ``seed`` a fresh one is drawn on the device (:func:`rectok_fast.ops.posterior_flow`).
            sample_offset: global index of this batch's first sample (a rank's slice of a global batch
                then draws that batch's numbers; seeded Triton path only).
            backend: overrides the module's ``backend`` for this call.
        """
        B, N, C2 = moments.shape
        noisy = self.training or self.noise_in_eval
        if t is None:
            if noisy:
                t = self.draw_time(B, grid=int(round(N**0.5)), channels=C2 // 2, device=moments.device)
            else:
                t = torch.zeros(B, device=moments.device)
        z, z_t, kl = ops.posterior_flow(
            moments,
            t,
            self.gamma if noisy else 0.0,
            noise=noise,
            seed=seed,
            sample_offset=sample_offset,
            sample_posterior=self.sample_posterior and self.training,
            backend=self.backend if backend is None else backend,
        )
        return FlowNoiserOutput(z, z_t, t, kl)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, schedule={self.schedule!r}, shift={self.shift}, backend={self.backend!r}"


class CosineAlignLoss(nn.Module):
    """Semantic alignment / masked-feature reconstruction loss: mean of ``relu(1 − cos − margin)``.

    ``forward(pred, target, token_mask=None)``: pred, target (B, N, D); ``token_mask`` (B, N) bool,
    True where the token was *masked* in the encoder.  ``target`` selects the tokens
    (:meth:`select`): ``"rec+align"`` all, ``"reconstruction"`` masked only (0 when none is),
    ``"align"`` visible only.  The teacher features get no gradient.  RecTok's semantic loss runs
    through this module.

    Example::

        loss_fn = CosineAlignLoss("rec+align")
        loss = loss_fn(sem_decoder(z_t), teacher(images), token_mask)
    """

    def __init__(self, target: str = "rec+align", margin: float = 0.0, backend: str = "auto"):
        super().__init__()
        if target not in SEMANTIC_TARGETS:
            raise ValueError(f"CosineAlignLoss: `target` must be one of {SEMANTIC_TARGETS}, got {target!r}")
        self.target, self.margin, self.backend = target, margin, backend

    def select(self, pred: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The (B, N) bool tokens that ``target`` scores for ``pred`` (B, N, D), or None for all."""
        if self.target == "reconstruction":
            if token_mask is None:
                return torch.zeros(pred.shape[:-1], dtype=torch.bool, device=pred.device)
            return token_mask
        if self.target == "align" and token_mask is not None:
            return ~token_mask.bool()
        return None

    def forward(self, pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return ops.cosine_align_loss(pred, target, self.select(pred, token_mask), self.margin, backend=self.backend)

    def extra_repr(self) -> str:
        return f"target={self.target!r}, margin={self.margin}, backend={self.backend!r}"


class KLAlignLoss(nn.Module):
    """Distribution-level alternative to :class:`CosineAlignLoss`: ``T²·KL(softmax(t/T) ‖ softmax(s/T))``
    over the feature dim, averaged over tokens.  ``forward(student, teacher, mask=None)``."""

    def __init__(self, temperature: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return ops.kl_align_loss(student, teacher, self.temperature, mask, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, backend={self.backend!r}"


class MaskTokenRestore(nn.Module):
    """MAE-style decoder input: K visible tokens + learned mask tokens, reordered by ``ids_restore``,
    plus an optional (learned) position embedding, in one fused pass.

    ``forward(visible (B, K, D), ids_restore (B, N)) -> (B, N, D)``.  With ``num_tokens`` given the
    module owns a (1, N, D) ``positional_embedding``; ``mask_token`` is (1, 1, D).

    Example (a MAETok / l-DeTok decoder)::

        restore = MaskTokenRestore(dim=768, num_tokens=256)
        x = restore(decoder_embed(latents_visible), ids_restore)
    """

    def __init__(self, dim: int, num_tokens: int | None = None, init_std: float = 0.02, backend: str = "auto"):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_embedding = nn.Parameter(torch.zeros(1, num_tokens, dim)) if num_tokens else None
        self.backend = backend
        if init_std > 0:
            nn.init.normal_(self.mask_token, std=init_std)
            if self.positional_embedding is not None:
                nn.init.normal_(self.positional_embedding, std=init_std)

    def forward(self, visible: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return ops.restore_tokens(visible, ids_restore, self.mask_token, self.positional_embedding, backend=self.backend)

    def extra_repr(self) -> str:
        n = None if self.positional_embedding is None else self.positional_embedding.shape[1]
        return f"dim={self.mask_token.shape[-1]}, num_tokens={n}, backend={self.backend!r}"


class TokenGather(nn.Module):
    """``x[b, ids_keep[b]] (+ pos[ids_keep[b]])`` — keep the visible tokens (and their position rows)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        return ops.gather_tokens(x, ids_keep, pos, backend=self.backend)


class FlowMatchingLoss(nn.Module):
    """The DiT velocity flow-matching loss with in-kernel x0 (noise) generation.

    ``x_t = noiser.xt(x1, t, seed)`` builds the model input; ``loss = noiser(pred, x1, t, seed)``
    regenerates the same x0 from ``seed`` and returns ``mean((pred − (x1 − x0))²)``.

    Example::

        fm = FlowMatchingLoss()
        seed = torch.randint(0, 2**62, (1,), device=x1.device)
        loss = fm(model(fm.xt(x1, t, seed), t, y), x1, t, seed)
    """

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def xt(self, x1: torch.Tensor, t: torch.Tensor, seed) -> torch.Tensor:
        return ops.flow_matching_xt(x1, t, seed=seed, backend=self.backend)

    def forward(self, pred: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, seed) -> torch.Tensor:
        return ops.flow_matching_loss(pred, x1, t, seed=seed, backend=self.backend)
