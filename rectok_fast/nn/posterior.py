"""The diagonal-Gaussian posterior of a KL autoencoder, in any layout, without a flow.

VA-VAE / LDM's ``DiagonalGaussianDistribution(moments)`` takes (B, 2C, H, W) moments (mean and
logvar stacked on the channel axis), clamps logvar to [-30, 20] and offers ``sample()``, ``mode()``
and ``kl()``.  :class:`GaussianPosterior` is the same computation over the fused ops: the sample and
the KL come out of one pass of :func:`rectok_fast.ops.posterior_flow` (γ = 0, t = 0: no flow noise,
in-kernel posterior noise from a seed), the KL alone from :func:`rectok_fast.ops.gaussian_kl`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from .. import ops
from .fused import check_backend, check_dim, tokens_back, tokens_last

__all__ = ["GaussianPosterior", "PosteriorOutput"]


class PosteriorOutput(NamedTuple):
    z: torch.Tensor  # posterior sample (or mean), the layout of `mean`
    kl: torch.Tensor  # (B,) fp32 KL(N(mean, var) ‖ N(0, I)) summed over all non-batch axes


class GaussianPosterior(nn.Module):
    """``mean, logvar = moments.chunk(2, dim)``; ``logvar`` clamped to [-30, 20] (the gradient passes
    where ``-30 <= logvar <= 20``), ``std = exp(logvar / 2)``.

    * :meth:`sample`: ``z = mean + std·ε`` (ε in-kernel from ``seed`` on the Triton path, or ``noise``);
    * :meth:`mode`: ``mean`` (a view of ``moments``);
    * :meth:`kl`: ``0.5·Σ(mean² + var − 1 − logvar)`` over every non-batch axis, (B,) fp32;
    * ``forward(moments)``: :class:`PosteriorOutput` ``(z, kl)`` from one fused pass (z is the sample in
      training, the mean in eval unless ``sample=True``).

    ``dim`` is the axis that holds ``mean ‖ logvar``: 1 for VA-VAE / LDM's (B, 2C, H, W), -1 for
    token-major (B, N, 2C).  Outputs have the layout of ``mean`` (for ``dim=1``: (B, C, H, W), a
    channels-last-strided view).

    Example (VA-VAE's encoder head)::

        post = GaussianPosterior(dim=1)
        z, kl = post(encoder(x))                  # moments (B, 2C, H, W) -> z (B, C, H, W), kl (B,)
        kl_loss = kl.sum() / kl.shape[0]
    """

    def __init__(self, dim: int = -1, backend: str = "auto"):
        super().__init__()
        self.dim = check_dim("GaussianPosterior", "dim", dim)
        self.backend = check_backend("GaussianPosterior", backend)

    def split(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) views of ``moments`` (logvar not clamped)."""
        if not isinstance(moments, torch.Tensor):
            raise TypeError(f"GaussianPosterior: `moments` must be a torch.Tensor, got {type(moments).__name__}")
        d = self.dim % moments.dim() if -moments.dim() <= self.dim < moments.dim() else None
        if d is None or d == 0:
            raise ValueError(
                f"GaussianPosterior: `dim`={self.dim} is not a non-batch axis of `moments` {tuple(moments.shape)}"
            )
        if moments.shape[d] % 2:
            raise ValueError(
                f"GaussianPosterior: axis {self.dim} of `moments` must be even (mean ‖ logvar), got {moments.shape[d]}"
            )
        mean, logvar = moments.chunk(2, d)
        return mean, logvar

    def mode(self, moments: torch.Tensor) -> torch.Tensor:
        """The posterior mean (a view of ``moments``)."""
        return self.split(moments)[0]

    def kl(self, moments: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
        """(B,) fp32 ``0.5·Σ(mean² + exp(logvar) − 1 − logvar)`` (:func:`rectok_fast.ops.gaussian_kl`)."""
        mean, logvar = self.split(moments)
        backend = self.backend if backend is None else check_backend("GaussianPosterior", backend)
        return ops.gaussian_kl(mean, logvar, backend=backend)

    def _run(self, moments, sample, noise, seed, sample_offset, backend) -> PosteriorOutput:
        self.split(moments)  # validates
        backend = self.backend if backend is None else check_backend("GaussianPosterior", backend)
        x, spatial, d = tokens_last(moments, self.dim, "GaussianPosterior", "moments")
        pair = None
        if noise is not None:
            e = tokens_last(noise, self.dim, "GaussianPosterior", "noise")[0]
            pair = (e, e)  # the flow noise is unused at γ = 0
        zeros = torch.zeros(x.shape[0], device=x.device)
        z, _, kl = ops.posterior_flow(
            x, zeros, 0.0, noise=pair, seed=seed, sample_offset=sample_offset, sample_posterior=sample, backend=backend
        )
        return PosteriorOutput(tokens_back(z, spatial, d), kl)

    def sample(
        self,
        moments: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        seed: int | torch.Tensor | None = None,
        sample_offset: int = 0,
        backend: str | None = None,
    ) -> torch.Tensor:
        """``mean + std·ε`` in the layout of ``mean``.  ``noise``: explicit ε shaped like ``mean``;
        ``seed``/``sample_offset``: the in-kernel Philox stream (see :func:`rectok_fast.ops.posterior_flow`)."""
        return self._run(moments, True, noise, seed, sample_offset, backend).z

    def forward(
        self,
        moments: torch.Tensor,
        *,
        sample: bool | None = None,
        noise: torch.Tensor | None = None,
        seed: int | torch.Tensor | None = None,
        sample_offset: int = 0,
        backend: str | None = None,
    ) -> PosteriorOutput:
        """``(z, kl)`` in one pass; ``sample`` defaults to ``self.training``."""
        return self._run(
            moments, self.training if sample is None else bool(sample), noise, seed, sample_offset, backend
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, backend={self.backend!r}"
