"""Drop-in nn.Modules over the fused ops, for RecTok and other latent tokenizers (VA-VAE, l-DeTok, REPA-E, MAETok).

Each module is a thin stateful wrapper: the math lives in :mod:`rectok_fast.ops`, so the module
runs the Triton kernels on CUDA tensors and the PyTorch reference elsewhere (``backend`` argument).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from .. import ops

_SEMANTIC_TARGETS = ("rec+align", "reconstruction", "align")


class FlowNoiserOutput(NamedTuple):
    z: torch.Tensor  # (B, N, C) posterior sample (or mean)
    z_t: torch.Tensor  # (B, N, C) flow input (1 - t)·z + t·γ·ε
    t: torch.Tensor  # (B,) fp32 flow times
    kl: torch.Tensor  # (B,) fp32 per-sample KL to N(0, I)


class FlowNoiser(nn.Module):
    """Posterior sampling + forward-flow interpolation + KL in one fused pass (RecTok §2).

    ``forward(moments, t=None)`` takes the encoder's (B, N, 2C) output (mean ‖ logvar); when ``t``
    is None it draws one time per sample from ``schedule`` (``"shift"`` uses s = sqrt(g²·C/4096)
    with g² = N unless ``shift`` is given).  In training the noise is generated in-kernel from a
    seed drawn on the device, so no B·N·C noise tensor is stored for backward.  In eval mode the
    posterior mean is used and no flow noise is added unless ``noise_in_eval``.

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
        if schedule not in ("uniform", "lognorm", "shift"):
            raise ValueError(f"FlowNoiser: `schedule` must be 'uniform', 'lognorm' or 'shift', got {schedule!r}")
        self.gamma, self.schedule, self.shift = gamma, schedule, shift
        self.sample_posterior, self.noise_in_eval, self.backend = sample_posterior, noise_in_eval, backend

    def forward(self, moments: torch.Tensor, t: torch.Tensor | None = None) -> FlowNoiserOutput:
        B, N, C2 = moments.shape
        noisy = self.training or self.noise_in_eval
        if t is None:
            if noisy:
                t = ops.sample_time(
                    B, self.schedule, shift=self.shift, grid=int(round(N**0.5)), channels=C2 // 2, device=moments.device
                )
            else:
                t = torch.zeros(B, device=moments.device)
        seed = torch.randint(0, 2**62, (1,), device=moments.device)
        z, z_t, kl = ops.posterior_flow(
            moments,
            t,
            self.gamma if noisy else 0.0,
            seed=seed,
            sample_posterior=self.sample_posterior and self.training,
            backend=self.backend,
        )
        return FlowNoiserOutput(z, z_t, t, kl)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, schedule={self.schedule!r}, shift={self.shift}, backend={self.backend!r}"


class CosineAlignLoss(nn.Module):
    """Semantic alignment / masked-feature reconstruction loss: mean of ``relu(1 − cos − margin)``.

    ``forward(pred, target, token_mask=None)``: pred, target (B, N, D); ``token_mask`` (B, N) bool,
    True where the token was *masked* in the encoder.  ``target`` selects the tokens:
    ``"rec+align"`` all, ``"reconstruction"`` masked only (0 when none is), ``"align"`` visible only.
    The teacher features get no gradient.

    Example::

        loss_fn = CosineAlignLoss("rec+align")
        loss = loss_fn(sem_decoder(z_t), teacher(images), token_mask)
    """

    def __init__(self, target: str = "rec+align", margin: float = 0.0, backend: str = "auto"):
        super().__init__()
        if target not in _SEMANTIC_TARGETS:
            raise ValueError(f"CosineAlignLoss: `target` must be one of {_SEMANTIC_TARGETS}, got {target!r}")
        self.target, self.margin, self.backend = target, margin, backend

    def forward(self, pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        select = None
        if self.target == "reconstruction":
            select = token_mask if token_mask is not None else torch.zeros(pred.shape[:-1], dtype=torch.bool, device=pred.device)
        elif self.target == "align" and token_mask is not None:
            select = ~token_mask.bool()
        return ops.cosine_align_loss(pred, target, select, self.margin, backend=self.backend)

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
