"""Adaptive loss weight from gradient norms at a shared last layer (VQGAN's GAN weight, VA-VAE's VF weight)."""

from __future__ import annotations

import torch

from .._validate import check_real

ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e8


def _grad_norm(loss: torch.Tensor, last_layer: torch.Tensor, name: str) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)
    if g is None:
        raise ValueError(f"adaptive_weight: `{name}` does not depend on `last_layer`")
    return torch.linalg.vector_norm(g, dtype=torch.float32)


def adaptive_weight(
    main_loss: torch.Tensor,
    aux_loss: torch.Tensor,
    last_layer: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """``scale · clamp(‖∇_W main_loss‖ / (‖∇_W aux_loss‖ + 1e-4), 0, 1e8)``, detached (0-dim fp32).

    ``W = last_layer`` is the weight both losses reach last (the decoder's output conv in VQGAN and
    VA-VAE); the weight balances the auxiliary loss (GAN, vision-foundation alignment) against the
    main one (reconstruction / NLL): ``total = main + adaptive_weight(main, aux, W) * aux``.

    Args:
        main_loss, aux_loss: 0-dim tensors in a graph that reaches ``last_layer``.  Their graphs are
            kept (``retain_graph=True``) so the caller can still backpropagate the total.
        last_layer: the parameter (or any tensor requiring grad) the norms are taken at.
        scale: multiplies the clamped ratio (a float).

    Gradient norms are accumulated in fp32.  Runs two extra backward passes to ``last_layer``.
    """
    for name, loss in (("main_loss", main_loss), ("aux_loss", aux_loss)):
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"adaptive_weight: `{name}` must be a torch.Tensor, got {type(loss).__name__}")
        if loss.dim() != 0:
            raise ValueError(f"adaptive_weight: `{name}` must be a 0-dim loss, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(f"adaptive_weight: `{name}` does not require grad (computed under no_grad or detached?)")
    if not isinstance(last_layer, torch.Tensor):
        raise TypeError(f"adaptive_weight: `last_layer` must be a torch.Tensor, got {type(last_layer).__name__}")
    if not last_layer.requires_grad:
        raise ValueError("adaptive_weight: `last_layer` must require grad")
    check_real("adaptive_weight", "scale", scale)
    g_main = _grad_norm(main_loss, last_layer, "main_loss")
    g_aux = _grad_norm(aux_loss, last_layer, "aux_loss")
    w = torch.clamp(g_main / (g_aux + ADAPTIVE_EPS), 0.0, ADAPTIVE_MAX).detach()
    return w * float(scale)


__all__ = ["ADAPTIVE_EPS", "ADAPTIVE_MAX", "adaptive_weight"]
