"""Fused DiT velocity flow matching (SPEC §4) with the noise ``x0`` generated in-kernel.

Chain: :mod:`rectok_fast.kernels.flow_matching` -> launchers -> registered ops
``rectok_fast::flow_matching_xt`` / ``rectok_fast::flow_matching_loss`` and their ``*_backward`` ops
(fake + autograd) -> the functionals :func:`flow_matching_xt` and :func:`flow_matching_loss`.

Called with the same ``seed``, both functionals regenerate the same ``x0`` (element ``e`` of the
row-major (B, ...) tensor draws Philox normal ``e``; see :mod:`rectok_fast.kernels.posterior_flow`),
and their backwards regenerate it again: no x0 tensor is ever stored.  :func:`flow_matching_noise`
materialises that x0.  ``sample_offset`` (global index of the batch's first sample) shifts the
counters by ``sample_offset·M`` so that sample ``b`` draws the x0 of global sample
``b + sample_offset``: a rank's slice ``[i:j]`` of a global batch called with ``sample_offset=i``
sees exactly rows ``i:j`` of the whole batch's x0 (forward and backward, bit for bit).  The
reference path draws x0 with ``torch.randn`` from a ``torch.Generator`` seeded with ``seed``: a
different stream from the Triton one, which cannot be offset (``sample_offset != 0`` raises there).
"""

from __future__ import annotations

import torch
import triton

from rectok_fast._backend import resolve_triton_backend, triton_interpret
from rectok_fast._validate import FLOAT_DTYPES, check_same_device, check_tensor
from rectok_fast.kernels.flow_matching import (
    flow_loss_bwd_kernel,
    flow_loss_fwd_kernel,
    flow_xt_bwd_kernel,
    flow_xt_fwd_kernel,
)
from rectok_fast.ops.posterior_flow import (
    _acc,
    check_offset_usage,
    check_sample_offset,
    default_seed,
    launch_normal_stream,
    reference_generator,
    seed_tensor,
)
from rectok_fast.reference.flow_matching import flow_matching_loss as _ref_loss
from rectok_fast.reference.flow_matching import flow_matching_xt as _ref_xt

__all__ = ["flow_matching_loss", "flow_matching_noise", "flow_matching_xt"]


def _block(M: int) -> tuple[int, int]:
    if triton_interpret():
        return max(16, min(triton.next_power_of_2(M), 16384)), 4
    return max(16, min(triton.next_power_of_2(M), 2048)), 4


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, M) view when the layout allows (else a copy); strides are passed to the kernel."""
    return x.reshape(x.shape[0], -1)


def _noise_arg(x0: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return _rows(x0).contiguous() if x0 is not None else dummy


# ----------------------------------------------------------------------------- launchers


def _xt_fwd(x1, t, seed, x0, offset=0):
    B = x1.shape[0]
    x = _rows(x1)
    M = x.shape[1]
    out = torch.empty(x1.shape, device=x1.device, dtype=x1.dtype)
    if out.numel() == 0:
        return out
    block, warps = _block(M)
    flow_xt_fwd_kernel[(B, triton.cdiv(M, block))](
        x,
        t.contiguous(),
        seed if seed is not None else out,
        _noise_arg(x0, out),
        out,
        M,
        int(offset) * M,
        *x.stride(),
        HAS_NOISE=x0 is not None,
        ACC=_acc(x1.dtype),
        BLOCK=block,
        num_warps=warps,
        enable_fp_fusion=False,  # x_t bit-identical to the eager reference given the same x0
    )
    return out


def _xt_bwd(grad, x1, t, seed, x0, offset=0):
    B = x1.shape[0]
    x = _rows(x1)
    M = x.shape[1]
    dx1 = torch.empty(x1.shape, device=x1.device, dtype=x1.dtype)
    if dx1.numel() == 0:
        return dx1, torch.zeros_like(t)
    block, warps = _block(M)
    P = triton.cdiv(M, block)
    dt_part = torch.empty((B, P), device=x1.device, dtype=torch.float32)
    flow_xt_bwd_kernel[(B, P)](
        grad.contiguous(),
        x,
        t.contiguous(),
        seed if seed is not None else dx1,
        _noise_arg(x0, dx1),
        dx1,
        dt_part,
        M,
        int(offset) * M,
        *x.stride(),
        HAS_NOISE=x0 is not None,
        ACC=_acc(x1.dtype),
        BLOCK=block,
        num_warps=warps,
    )
    return dx1, dt_part.sum(1).to(t.dtype)


def _loss_fwd(pred, x1, seed, x0, offset=0):
    B = x1.shape[0]
    p, x = _rows(pred), _rows(x1)
    M = x.shape[1]
    if x.numel() == 0:
        return torch.full((), float("nan"), device=x1.device, dtype=torch.float32)
    block, warps = _block(M)
    P = triton.cdiv(M, block)
    part = torch.empty((B, P), device=x1.device, dtype=torch.float32)
    flow_loss_fwd_kernel[(B, P)](
        p,
        x,
        seed if seed is not None else part,
        _noise_arg(x0, part),
        part,
        M,
        int(offset) * M,
        *p.stride(),
        *x.stride(),
        HAS_NOISE=x0 is not None,
        ACC=_acc(torch.promote_types(pred.dtype, x1.dtype)),
        BLOCK=block,
        num_warps=warps,
    )
    return part.sum() / x.numel()


def _loss_bwd(grad, pred, x1, seed, x0, offset=0):
    B = x1.shape[0]
    p, x = _rows(pred), _rows(x1)
    M = x.shape[1]
    dpred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
    dx1 = torch.empty(x1.shape, device=x1.device, dtype=x1.dtype)
    if x.numel() == 0:
        return dpred, dx1
    block, warps = _block(M)
    flow_loss_bwd_kernel[(B, triton.cdiv(M, block))](
        grad.reshape(1).to(torch.float32),
        p,
        x,
        seed if seed is not None else dpred,
        _noise_arg(x0, dpred),
        dpred,
        dx1,
        M,
        int(offset) * M,
        x.numel(),
        *p.stride(),
        *x.stride(),
        HAS_NOISE=x0 is not None,
        ACC=_acc(torch.promote_types(pred.dtype, x1.dtype)),
        BLOCK=block,
        num_warps=warps,
    )
    return dpred, dx1


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("rectok_fast::flow_matching_xt", mutates_args=())
def _xt_op(
    x1: torch.Tensor, t: torch.Tensor, seed: torch.Tensor | None, x0: torch.Tensor | None, sample_offset: int = 0
) -> torch.Tensor:
    return _xt_fwd(x1, t, seed, x0, sample_offset)


@_xt_op.register_fake
def _(x1, t, seed, x0, sample_offset=0):
    return x1.new_empty(x1.shape)


@torch.library.custom_op("rectok_fast::flow_matching_xt_backward", mutates_args=())
def _xt_bwd_op(
    grad: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor,
    seed: torch.Tensor | None,
    x0: torch.Tensor | None,
    sample_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _xt_bwd(grad, x1, t, seed, x0, sample_offset)


@_xt_bwd_op.register_fake
def _(grad, x1, t, seed, x0, sample_offset=0):
    return x1.new_empty(x1.shape), torch.empty_like(t)


def _xt_setup(ctx, inputs, output):
    x1, t, seed, x0, sample_offset = inputs
    ctx.save_for_backward(x1, t, seed, x0)
    ctx.sample_offset = sample_offset


def _xt_backward(ctx, grad):
    x1, t, seed, x0 = ctx.saved_tensors
    dx1, dt = _xt_bwd_op(grad, x1, t, seed, x0, ctx.sample_offset)
    return dx1, dt, None, None, None


_xt_op.register_autograd(_xt_backward, setup_context=_xt_setup)


@torch.library.custom_op("rectok_fast::flow_matching_loss", mutates_args=())
def _loss_op(
    pred: torch.Tensor, x1: torch.Tensor, seed: torch.Tensor | None, x0: torch.Tensor | None, sample_offset: int = 0
) -> torch.Tensor:
    return _loss_fwd(pred, x1, seed, x0, sample_offset)


@_loss_op.register_fake
def _(pred, x1, seed, x0, sample_offset=0):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("rectok_fast::flow_matching_loss_backward", mutates_args=())
def _loss_bwd_op(
    grad: torch.Tensor,
    pred: torch.Tensor,
    x1: torch.Tensor,
    seed: torch.Tensor | None,
    x0: torch.Tensor | None,
    sample_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _loss_bwd(grad, pred, x1, seed, x0, sample_offset)


@_loss_bwd_op.register_fake
def _(grad, pred, x1, seed, x0, sample_offset=0):
    return pred.new_empty(pred.shape), x1.new_empty(x1.shape)


def _loss_setup(ctx, inputs, output):
    pred, x1, seed, x0, sample_offset = inputs
    ctx.save_for_backward(pred, x1, seed, x0)
    ctx.sample_offset = sample_offset


def _loss_backward(ctx, grad):
    pred, x1, seed, x0 = ctx.saved_tensors
    dpred, dx1 = _loss_bwd_op(grad, pred, x1, seed, x0, ctx.sample_offset)
    return dpred, dx1, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# ----------------------------------------------------------------------------- functionals


def _validate(op, x1, t, noise, seed, pred=None):
    check_tensor(op, "x1", x1, dtypes=FLOAT_DTYPES)
    if x1.dim() < 1:
        raise ValueError(f"{op}: `x1` must have a batch dim (B, ...), got a 0-dim tensor")
    B = x1.shape[0]
    if pred is not None:
        check_tensor(op, "pred", pred, dtypes=FLOAT_DTYPES)
        if pred.shape != x1.shape:
            raise ValueError(f"{op}: `pred` must have the shape of `x1` {tuple(x1.shape)}, got {tuple(pred.shape)}")
    check_tensor(op, "t", t, dtypes=FLOAT_DTYPES)
    if t.dim() > 1 or t.numel() != B:
        raise ValueError(f"{op}: `t` must have shape ({B},) (one time per sample), got {tuple(t.shape)}")
    if noise is not None and seed is not None:
        raise ValueError(f"{op}: pass either `noise` or `seed`, not both")
    if noise is not None:
        check_tensor(op, "noise", noise, dtypes=FLOAT_DTYPES)
        if noise.shape != x1.shape:
            raise ValueError(f"{op}: `noise` must have the shape of `x1` {tuple(x1.shape)}, got {tuple(noise.shape)}")
    check_same_device(op, x1=x1, t=t, pred=pred, noise=noise)


def _reference_noise(x1: torch.Tensor, seed) -> torch.Tensor:
    gen = reference_generator(seed, x1.device)
    kw = {} if gen is None else {"generator": gen}  # generator=None rejects symbolic shapes under compile
    return torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, **kw)


def flow_matching_xt(
    x1: torch.Tensor,
    t: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    sample_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """The model input ``x_t = t·x1 + (1 − t)·x0`` (t = 1 is the data end), x0 ~ N(0, I) in-kernel.

    Args:
        x1: (B, ...) data latents, any float dtype and strides.
        t: (B,) time per sample; gradients flow to ``x1`` and ``t``.
        noise: optional explicit x0 with the shape of ``x1`` (no gradient).
        seed: python int or 1-element integer tensor; the same seed in :func:`flow_matching_loss`
            regenerates the same x0.  At most one of ``noise`` / ``seed``; with neither, a seed is
            drawn from torch's default generator on the device of ``x1``.
        sample_offset: global index of this batch's first sample (>= 0): sample ``b`` draws the
            x0 of global sample ``b + sample_offset`` (a rank's slice ``[i:j]`` with
            ``sample_offset=i`` sees rows ``i:j`` of the global batch's x0).  Seeded Triton stream
            only: nonzero with ``noise`` or on the reference path raises ``ValueError``.
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (the reference draws x0 from a
            ``torch.Generator`` seeded with ``seed``: not the Triton stream).

    Returns:
        x_t with the shape and dtype of ``x1``.
    """
    op = "flow_matching_xt"
    _validate(op, x1, t, noise, seed)
    check_sample_offset(op, sample_offset, x1.shape[0], x1[0].numel() if x1.shape[0] else 0)
    t = t.reshape(-1)
    chosen = resolve_triton_backend(op, backend, x1, t)
    check_offset_usage(op, sample_offset, noise is not None, chosen)
    if chosen == "reference":
        x0 = noise if noise is not None else _reference_noise(x1, seed)
        return _ref_xt(x1, t, x0)
    if noise is not None:
        return _xt_op(x1, t, None, noise, 0)
    s = default_seed(x1.device) if seed is None else seed_tensor(op, seed, x1.device)
    return _xt_op(x1, t, s, None, sample_offset)


def flow_matching_loss(
    pred: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    sample_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Velocity flow-matching loss ``mean((pred − (x1 − x0))²)`` as a 0-dim fp32 tensor.

    Args:
        pred: (B, ...) predicted velocity, the shape of ``x1``.
        x1: (B, ...) data latents.
        t: (B,) time per sample (validated; the target does not depend on it, so no gradient).
        noise, seed, sample_offset, backend: as in :func:`flow_matching_xt`; pass the seed and
            offset used for ``x_t``.  The mean is over this call's (local) ``B·M`` elements.

    Returns:
        0-dim fp32 loss; gradients flow to ``pred`` and ``x1``.
    """
    op = "flow_matching_loss"
    _validate(op, x1, t, noise, seed, pred=pred)
    check_sample_offset(op, sample_offset, x1.shape[0], x1[0].numel() if x1.shape[0] else 0)
    t = t.reshape(-1)
    chosen = resolve_triton_backend(op, backend, pred, x1, t)
    check_offset_usage(op, sample_offset, noise is not None, chosen)
    if chosen == "reference":
        x0 = noise if noise is not None else _reference_noise(x1, seed)
        return _ref_loss(pred, x1, t, x0)
    if noise is not None:
        return _loss_op(pred, x1, None, noise, 0)
    s = default_seed(x1.device) if seed is None else seed_tensor(op, seed, x1.device)
    return _loss_op(pred, x1, s, None, sample_offset)


def flow_matching_noise(
    seed: int | torch.Tensor,
    shape: tuple[int, ...],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    sample_offset: int = 0,
) -> torch.Tensor:
    """The x0 of ``shape`` (B, ...) that the Triton path generates for ``seed`` and ``sample_offset``
    (small kernel, same formula); with ``sample_offset=i`` it is rows ``i:i+B`` of the x0 of a
    larger batch with the same per-sample shape."""
    device = (
        torch.device(device)
        if device is not None
        else (seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu"))
    )
    resolve_triton_backend("flow_matching_noise", "triton", torch.empty(0, device=device))
    s = seed_tensor("flow_matching_noise", seed, device)
    numel = 1
    for d in shape:
        numel *= int(d)
    per_sample = numel // int(shape[0]) if len(shape) and int(shape[0]) else 0
    e_off = check_sample_offset("flow_matching_noise", sample_offset, int(shape[0]) if len(shape) else 1, per_sample)
    a, _ = launch_normal_stream(s, numel, device, dtype, two=False, e_off=e_off)
    return a.view(*shape)
