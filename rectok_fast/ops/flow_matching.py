"""Fused DiT velocity flow matching (method §4) with the noise ``x0`` generated in-kernel.

Chain: :mod:`rectok_fast.kernels.flow_matching` -> launchers -> registered ops
``rectok_fast::flow_matching_xt_fwd`` / ``_bwd`` and ``rectok_fast::flow_matching_loss_fwd`` / ``_bwd``
(fake + autograd) -> the functionals :func:`flow_matching_xt` and :func:`flow_matching_loss`.

Called with the same ``seed``, both functionals regenerate the same ``x0`` (noise stream
``NOISE_STREAM_VERSION`` = 2 of :mod:`rectok_fast.kernels.philox`: one Philox-4x32 call per four
elements of a sample's row), and their backwards regenerate it again: no x0 tensor is ever stored.
:func:`flow_matching_noise` materialises that x0.  ``sample_offset`` (global index of the batch's
first sample) keys the counters by the global sample ``b + sample_offset``: a rank's slice
``[i:j]`` of a global batch called with ``sample_offset=i`` sees exactly rows ``i:j`` of the whole
batch's x0 (forward and backward, bit for bit).  A Python ``int`` seed is a kernel scalar (no copy,
no sync, no recompile).  The backwards write only the gradients autograd asks for (no ``dx1`` when
``x1`` needs none, no dL/dt partials when ``t`` needs none: then ``flow_matching_xt``'s backward
does not regenerate x0 at all).  The reference path draws x0 with ``torch.randn`` from a
``torch.Generator`` seeded with ``seed``: a different stream from the Triton one, which cannot be
offset (``sample_offset != 0`` raises there).
"""

from __future__ import annotations

import math

import torch

from .._backend import kernels, resolve_backend, triton_interpret
from .._constants import FLOAT_DTYPES
from .._validate import check_same_device, check_tensor

# LightningDiT's velocity cosine term as a plain PyTorch functional (fused only inside flow_matching_loss).
from ..reference.flow_matching import COSINE_EPS, velocity_cosine_loss
from ..reference.flow_matching import flow_matching_loss as _ref_loss
from ..reference.flow_matching import flow_matching_xt as _ref_xt
from ._launch import acc_dtype as _acc
from ._launch import cdiv, next_power_of_2
from ._noise import (
    FM_LANE,
    NOISE_STREAM_VERSION,
    PHILOX_ROUNDS,
    check_flow_row,
    check_offset_usage,
    check_rounds,
    check_sample_offset,
    default_seed,
    flow_rows,
    launch_flow_noise,
    reference_generator,
    seed_args,
)

__all__ = [
    "NOISE_STREAM_VERSION",
    "flow_matching_loss",
    "flow_matching_noise",
    "flow_matching_xt",
    "velocity_cosine_loss",
]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, M) view when the layout allows (else a copy); strides are passed to the kernel.
    In-row offsets are int32: a row whose strided span reaches 2**31 elements is copied."""
    x = x.reshape(x.shape[0], -1)
    if x.shape[1] and abs(x.stride(1)) * (x.shape[1] + 4 * FM_LANE) >= 2**31:
        x = x.contiguous()
    return x


def _noise_arg(x0: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return x0.reshape(x0.shape[0], -1).contiguous() if x0 is not None else dummy


def _grid(B: int, M: int) -> tuple[tuple[int, int], int, int]:
    rows, warps = flow_rows(M)
    return (B, cdiv(M, 4 * FM_LANE * rows)), rows, warps


def _seed_ptr(seed, dummy):
    return seed if seed is not None else dummy


# ----------------------------------------------------------------------------- launchers


def _xt_fwd(x1, t, seed, x0, offset, seed_int, rounds):
    out = torch.empty(x1.shape, device=x1.device, dtype=x1.dtype)
    if out.numel() == 0:
        return out
    x = _rows(x1)
    B, M = x.shape
    grid, rows, warps = _grid(B, M)
    kernels("flow_matching").flow_xt_fwd_kernel[grid](
        x,
        t.contiguous(),
        _seed_ptr(seed, out),
        _noise_arg(x0, out),
        out,
        M,
        int(seed_int),
        int(offset),
        *x.stride(),
        HAS_NOISE=x0 is not None,
        SEED_IN_PTR=seed is not None,
        ROUNDS=rounds,
        ACC=_acc(x1.dtype),
        ROWS=rows,
        LANE=FM_LANE,
        EVEN=M % (4 * FM_LANE * rows) == 0,
        num_warps=warps,
        enable_fp_fusion=True,  # the interpreter never contracts: on the CPU x_t equals the eager reference bit for bit
    )
    return out


def _xt_bwd(grad, x1, t, seed, x0, offset, seed_int, need_dx1, need_dt, rounds):
    dx1 = torch.empty(x1.shape, device=x1.device, dtype=x1.dtype) if need_dx1 else x1.new_empty(0)
    B = x1.shape[0]
    if x1.numel() == 0 or not (need_dx1 or need_dt):
        return dx1, (torch.zeros_like(t) if need_dt else t.new_empty(0))
    x = _rows(x1)
    M = x.shape[1]
    grid, rows, warps = _grid(B, M)
    dt_part = torch.empty(grid if need_dt else (0,), device=x1.device, dtype=torch.float32)
    kernels("flow_matching").flow_xt_bwd_kernel[grid](
        grad.contiguous(),
        x,
        t.contiguous(),
        _seed_ptr(seed, x),
        _noise_arg(x0, x),
        dx1 if need_dx1 else x,
        dt_part if need_dt else x,
        M,
        int(seed_int),
        int(offset),
        *x.stride(),
        HAS_NOISE=x0 is not None,
        NEED_DX1=need_dx1,
        NEED_DT=need_dt,
        SEED_IN_PTR=seed is not None,
        ROUNDS=rounds,
        ACC=_acc(x1.dtype),
        ROWS=rows,
        LANE=FM_LANE,
        EVEN=M % (4 * FM_LANE * rows) == 0,
        num_warps=warps,
    )
    return dx1, (dt_part.sum(1).to(t.dtype) if need_dt else t.new_empty(0))


def _cos_layout(pred, x1):
    """(C, S, K, PAIRED, BLOCK_C, BLOCK_S, num_warps) of the cosine kernels: x1 as (B, C, S), S = prod(shape[2:]).
    PAIRED when S divides FM_LANE (K = FM_LANE // S) and C >= 4K: one Philox call then serves the
    four channels c, c + K, c + 2K, c + 3K of a position (BLOCK_C counts such channel quadruples; the
    loop walks C rounded up to 4K channels, so with C < 4K it would draw more calls than elements);
    otherwise every element draws its own lane of its Philox call."""
    C = int(x1.shape[1])
    S = x1.numel() // (x1.shape[0] * C)
    paired = FM_LANE % S == 0 and C >= 4 * (FM_LANE // S)
    K = FM_LANE // S if paired else 1
    rows = cdiv(C, 4 * K) * K if paired else C  # channel rows the loop walks
    if triton_interpret():  # fewer, larger tiles: the interpreter's cost is per operation
        bs = min(next_power_of_2(S), 256)
        return C, S, K, paired, min(next_power_of_2(rows), 64 if not paired else 16), bs, 4
    # 64 positions × 32 channels (or 8 quadruples) per iteration, 16 elements per thread of 4 warps;
    # s is the contiguous axis of channels-first latents (coalesced)
    bs = min(next_power_of_2(S), 64)
    return C, S, K, paired, min(next_power_of_2(rows), max(1, (512 if paired else 2048) // bs)), bs, 4


def _cos_loss_fwd(pred, x1, seed, x0, offset, seed_int, rounds, cosine_weight):
    if x1.numel() == 0:
        return torch.full((), float("nan"), device=x1.device, dtype=torch.float32)
    p, x = _rows(pred), _rows(x1)
    B = x.shape[0]
    C, S, K, paired, bc, bs, warps = _cos_layout(pred, x1)
    part = torch.empty((B, cdiv(S, bs)), device=x1.device, dtype=torch.float32)
    kernels("flow_matching").flow_cos_loss_fwd_kernel[part.shape](
        p,
        x,
        _seed_ptr(seed, part),
        _noise_arg(x0, part),
        part,
        C,
        S,
        K,
        1.0 / x.numel(),
        float(cosine_weight) / (B * S),
        int(seed_int),
        int(offset),
        *p.stride(),
        *x.stride(),
        HAS_NOISE=x0 is not None,
        SEED_IN_PTR=seed is not None,
        ROUNDS=rounds,
        ACC=_acc(torch.promote_types(pred.dtype, x1.dtype)),
        LANE=FM_LANE,
        BLOCK_C=bc,
        BLOCK_S=bs,
        PAIRED=paired,
        EPS=COSINE_EPS,
        num_warps=warps,
    )
    return part.sum()


def _cos_loss_bwd(grad, pred, x1, seed, x0, offset, seed_int, need_dpred, need_dx1, rounds, cosine_weight):
    dpred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype) if need_dpred else pred.new_empty(0)
    dx1 = torch.empty(x1.shape, device=x1.device, dtype=x1.dtype) if need_dx1 else x1.new_empty(0)
    if x1.numel() == 0 or not (need_dpred or need_dx1):
        return dpred, dx1
    p, x = _rows(pred), _rows(x1)
    B = x.shape[0]
    C, S, K, paired, bc, bs, warps = _cos_layout(pred, x1)
    kernels("flow_matching").flow_cos_loss_bwd_kernel[(B, cdiv(S, bs))](
        grad.reshape(1).to(torch.float32),
        p,
        x,
        _seed_ptr(seed, x),
        _noise_arg(x0, x),
        dpred if need_dpred else x,
        dx1 if need_dx1 else x,
        C,
        S,
        K,
        2.0 / x.numel(),
        float(cosine_weight) / (B * S),
        int(seed_int),
        int(offset),
        *p.stride(),
        *x.stride(),
        HAS_NOISE=x0 is not None,
        NEED_DPRED=need_dpred,
        NEED_DX1=need_dx1,
        SEED_IN_PTR=seed is not None,
        ROUNDS=rounds,
        ACC=_acc(torch.promote_types(pred.dtype, x1.dtype)),
        LANE=FM_LANE,
        BLOCK_C=bc,
        BLOCK_S=bs,
        PAIRED=paired,
        EPS=COSINE_EPS,
        num_warps=warps,
    )
    return dpred, dx1


def _loss_fwd(pred, x1, seed, x0, offset, seed_int, rounds):
    if x1.numel() == 0:
        return torch.full((), float("nan"), device=x1.device, dtype=torch.float32)
    p, x = _rows(pred), _rows(x1)
    B, M = x.shape
    grid, rows, warps = _grid(B, M)
    part = torch.empty(grid, device=x1.device, dtype=torch.float32)
    kernels("flow_matching").flow_loss_fwd_kernel[grid](
        p,
        x,
        _seed_ptr(seed, part),
        _noise_arg(x0, part),
        part,
        M,
        1.0 / x.numel(),
        int(seed_int),
        int(offset),
        *p.stride(),
        *x.stride(),
        HAS_NOISE=x0 is not None,
        SEED_IN_PTR=seed is not None,
        ROUNDS=rounds,
        ACC=_acc(torch.promote_types(pred.dtype, x1.dtype)),
        ROWS=rows,
        LANE=FM_LANE,
        EVEN=M % (4 * FM_LANE * rows) == 0,
        num_warps=warps,
    )
    return part.sum()  # the partials are already divided by B·M: one reduction, no division kernel


def _loss_bwd(grad, pred, x1, seed, x0, offset, seed_int, need_dpred, need_dx1, rounds):
    dpred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype) if need_dpred else pred.new_empty(0)
    dx1 = torch.empty(x1.shape, device=x1.device, dtype=x1.dtype) if need_dx1 else x1.new_empty(0)
    if x1.numel() == 0 or not (need_dpred or need_dx1):
        return dpred, dx1
    p, x = _rows(pred), _rows(x1)
    B, M = x.shape
    grid, rows, warps = _grid(B, M)
    kernels("flow_matching").flow_loss_bwd_kernel[grid](
        grad.reshape(1).to(torch.float32),
        p,
        x,
        _seed_ptr(seed, x),
        _noise_arg(x0, x),
        dpred if need_dpred else x,
        dx1 if need_dx1 else x,
        M,
        2.0 / x.numel(),
        int(seed_int),
        int(offset),
        *p.stride(),
        *x.stride(),
        HAS_NOISE=x0 is not None,
        NEED_DPRED=need_dpred,
        NEED_DX1=need_dx1,
        SEED_IN_PTR=seed is not None,
        ROUNDS=rounds,
        ACC=_acc(torch.promote_types(pred.dtype, x1.dtype)),
        ROWS=rows,
        LANE=FM_LANE,
        EVEN=M % (4 * FM_LANE * rows) == 0,
        num_warps=warps,
    )
    return dpred, dx1


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("rectok_fast::flow_matching_xt_fwd", mutates_args=())
def _xt_fwd_op(
    x1: torch.Tensor,
    t: torch.Tensor,
    seed: torch.Tensor | None,
    x0: torch.Tensor | None,
    sample_offset: int = 0,
    seed_int: int = 0,
    philox_rounds: int = PHILOX_ROUNDS,
) -> torch.Tensor:
    return _xt_fwd(x1, t, seed, x0, sample_offset, seed_int, philox_rounds)


@_xt_fwd_op.register_fake
def _(x1, t, seed, x0, sample_offset=0, seed_int=0, philox_rounds=PHILOX_ROUNDS):
    return x1.new_empty(x1.shape)


@torch.library.custom_op("rectok_fast::flow_matching_xt_bwd", mutates_args=())
def _xt_bwd_op(
    grad: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor,
    seed: torch.Tensor | None,
    x0: torch.Tensor | None,
    sample_offset: int = 0,
    seed_int: int = 0,
    need_dx1: bool = True,
    need_dt: bool = True,
    philox_rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx1, dt); each is an empty tensor when not needed."""
    return _xt_bwd(grad, x1, t, seed, x0, sample_offset, seed_int, need_dx1, need_dt, philox_rounds)


@_xt_bwd_op.register_fake
def _(grad, x1, t, seed, x0, sample_offset=0, seed_int=0, need_dx1=True, need_dt=True, philox_rounds=PHILOX_ROUNDS):
    return (x1.new_empty(x1.shape) if need_dx1 else x1.new_empty(0)), (
        torch.empty_like(t) if need_dt else t.new_empty(0)
    )


def _xt_setup(ctx, inputs, output):
    x1, t, seed, x0, sample_offset, seed_int, rounds = inputs
    ctx.save_for_backward(x1, t, seed, x0)
    ctx.sample_offset, ctx.seed_int, ctx.rounds = sample_offset, seed_int, rounds


def _xt_backward(ctx, grad):
    x1, t, seed, x0 = ctx.saved_tensors
    need_dx1, need_dt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx1, dt = _xt_bwd_op(grad, x1, t, seed, x0, ctx.sample_offset, ctx.seed_int, need_dx1, need_dt, ctx.rounds)
    return (dx1 if need_dx1 else None), (dt if need_dt else None), None, None, None, None, None


_xt_fwd_op.register_autograd(_xt_backward, setup_context=_xt_setup)


@torch.library.custom_op("rectok_fast::flow_matching_loss_fwd", mutates_args=())
def _loss_fwd_op(
    pred: torch.Tensor,
    x1: torch.Tensor,
    seed: torch.Tensor | None,
    x0: torch.Tensor | None,
    sample_offset: int = 0,
    seed_int: int = 0,
    philox_rounds: int = PHILOX_ROUNDS,
    cosine_weight: float = 0.0,
) -> torch.Tensor:
    if cosine_weight:
        return _cos_loss_fwd(pred, x1, seed, x0, sample_offset, seed_int, philox_rounds, cosine_weight)
    return _loss_fwd(pred, x1, seed, x0, sample_offset, seed_int, philox_rounds)


@_loss_fwd_op.register_fake
def _(pred, x1, seed, x0, sample_offset=0, seed_int=0, philox_rounds=PHILOX_ROUNDS, cosine_weight=0.0):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("rectok_fast::flow_matching_loss_bwd", mutates_args=())
def _loss_bwd_op(
    grad: torch.Tensor,
    pred: torch.Tensor,
    x1: torch.Tensor,
    seed: torch.Tensor | None,
    x0: torch.Tensor | None,
    sample_offset: int = 0,
    seed_int: int = 0,
    need_dpred: bool = True,
    need_dx1: bool = True,
    philox_rounds: int = PHILOX_ROUNDS,
    cosine_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dpred, dx1); each is an empty tensor when not needed."""
    args = (grad, pred, x1, seed, x0, sample_offset, seed_int, need_dpred, need_dx1, philox_rounds)
    if cosine_weight:
        return _cos_loss_bwd(*args, cosine_weight)
    return _loss_bwd(*args)


@_loss_bwd_op.register_fake
def _(
    grad,
    pred,
    x1,
    seed,
    x0,
    sample_offset=0,
    seed_int=0,
    need_dpred=True,
    need_dx1=True,
    philox_rounds=PHILOX_ROUNDS,
    cosine_weight=0.0,
):
    return (pred.new_empty(pred.shape) if need_dpred else pred.new_empty(0)), (
        x1.new_empty(x1.shape) if need_dx1 else x1.new_empty(0)
    )


def _loss_setup(ctx, inputs, output):
    pred, x1, seed, x0, sample_offset, seed_int, rounds, cosine_weight = inputs
    ctx.save_for_backward(pred, x1, seed, x0)
    ctx.sample_offset, ctx.seed_int, ctx.rounds, ctx.cosine_weight = sample_offset, seed_int, rounds, cosine_weight


def _loss_backward(ctx, grad):
    pred, x1, seed, x0 = ctx.saved_tensors
    need_dp, need_dx1 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dpred, dx1 = _loss_bwd_op(
        grad, pred, x1, seed, x0, ctx.sample_offset, ctx.seed_int, need_dp, need_dx1, ctx.rounds, ctx.cosine_weight
    )
    return (dpred if need_dp else None), (dx1 if need_dx1 else None), None, None, None, None, None, None


_loss_fwd_op.register_autograd(_loss_backward, setup_context=_loss_setup)


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


def _check_cosine_weight(op: str, w, x1: torch.Tensor) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"{op}: `cosine_weight` must be a finite python float, got {w!r}")
    if w and x1.dim() < 2:
        raise ValueError(f"{op}: the cosine term needs a channel dim: (B, C, ...) inputs, got {tuple(x1.shape)}")
    return float(w)


def _per_sample(x: torch.Tensor) -> int:
    n = 1
    for d in x.shape[1:]:
        n *= int(d)
    return n


def _reference_noise(x1: torch.Tensor, seed, op: str) -> torch.Tensor:
    gen = reference_generator(seed, x1.device, op)
    kw = {} if gen is None else {"generator": gen}  # generator=None rejects symbolic shapes under compile
    return torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, **kw)


def flow_matching_xt(
    x1: torch.Tensor,
    t: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    sample_offset: int = 0,
    philox_rounds: int = PHILOX_ROUNDS,
    backend: str = "auto",
) -> torch.Tensor:
    """The model input ``x_t = t·x1 + (1 − t)·x0`` (t = 1 is the data end), x0 ~ N(0, I) in-kernel.

    Args:
        x1: (B, ...) data latents, any float dtype and strides.
        t: (B,) time per sample; gradients flow to ``x1`` and ``t``.
        noise: optional explicit x0 with the shape of ``x1`` (no gradient).
        seed: python int (a kernel scalar: no copy, no sync, no recompile) or 1-element integer
            tensor (read on the device); the same seed in :func:`flow_matching_loss` regenerates
            the same x0.  At most one of ``noise`` / ``seed``; with neither, a seed is
            drawn from torch's default generator on the device of ``x1``.
        sample_offset: global index of this batch's first sample (>= 0): sample ``b`` draws the
            x0 of global sample ``b + sample_offset`` (a rank's slice ``[i:j]`` with
            ``sample_offset=i`` sees rows ``i:j`` of the global batch's x0).  Seeded Triton stream
            only: nonzero with ``noise`` or on the reference path raises ``ValueError``.
        philox_rounds: Philox rounds of the in-kernel stream, 10 (default) or 7 (a different stream).
        backend: ``"auto"`` | ``"triton"`` | ``"reference"`` (the reference draws x0 from a
            ``torch.Generator`` seeded with ``seed``: not the Triton stream).

    Returns:
        x_t with the shape and dtype of ``x1``.
    """
    op = "flow_matching_xt"
    _validate(op, x1, t, noise, seed)
    check_sample_offset(op, sample_offset, x1.shape[0])
    check_flow_row(op, _per_sample(x1))
    rounds = check_rounds(op, philox_rounds)
    t = t.reshape(-1)
    chosen = resolve_backend(op, backend, x1, t)
    check_offset_usage(op, sample_offset, noise is not None, chosen)
    if chosen == "reference":
        x0 = noise if noise is not None else _reference_noise(x1, seed, op)
        return _ref_xt(x1, t, x0)
    if noise is not None:
        return _xt_fwd_op(x1, t, None, noise, 0)
    seed_t, seed_int = (default_seed(x1.device), 0) if seed is None else seed_args(op, seed, x1.device)
    return _xt_fwd_op(x1, t, seed_t, None, sample_offset, seed_int, rounds)


def flow_matching_loss(
    pred: torch.Tensor,
    x1: torch.Tensor,
    t: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    sample_offset: int = 0,
    philox_rounds: int = PHILOX_ROUNDS,
    cosine_weight: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Velocity flow-matching loss ``mean((pred − (x1 − x0))²)`` as a 0-dim fp32 tensor, plus
    LightningDiT's ``cosine_weight · mean over (b, spatial) of (1 − cos(pred, x1 − x0))`` when
    ``cosine_weight`` != 0.

    Args:
        pred: (B, ...) predicted velocity, the shape of ``x1``.
        x1: (B, ...) data latents.
        t: (B,) time per sample (validated; the target does not depend on it, so no gradient).
        noise, seed, sample_offset, philox_rounds, backend: as in :func:`flow_matching_xt`; pass
            the seed, offset and rounds used for ``x_t``.  The mean is over this call's (local) ``B·M`` elements.
        cosine_weight: weight of the cosine term (python float, default 0: the plain loss and its
            kernels).  cos is taken over the channel dim 1 of (B, C, ...) inputs (every later dim is
            spatial; (B, C) is one position), as ``F.cosine_similarity(dim=1, eps=1e-8)``:
            ``pred·v / (max(‖pred‖, 1e-8)·max(‖v‖, 1e-8))``, v = x1 − x0, with torch's gradient.  The
            Triton path builds v from the regenerated x0 in-kernel (per-position channel reductions in
            fp32, fp64 for fp64 inputs; no x0 stored; the backward regenerates it twice).

    Returns:
        0-dim fp32 loss; gradients flow to ``pred`` and ``x1``.
    """
    op = "flow_matching_loss"
    _validate(op, x1, t, noise, seed, pred=pred)
    cosine_weight = _check_cosine_weight(op, cosine_weight, x1)
    check_sample_offset(op, sample_offset, x1.shape[0])
    check_flow_row(op, _per_sample(x1))
    rounds = check_rounds(op, philox_rounds)
    t = t.reshape(-1)
    chosen = resolve_backend(op, backend, pred, x1, t)
    check_offset_usage(op, sample_offset, noise is not None, chosen)
    if chosen == "reference":
        x0 = noise if noise is not None else _reference_noise(x1, seed, op)
        return _ref_loss(pred, x1, t, x0, cosine_weight=cosine_weight)
    if noise is not None:
        if cosine_weight:
            return _loss_fwd_op(pred, x1, None, noise, 0, 0, PHILOX_ROUNDS, cosine_weight)
        return _loss_fwd_op(pred, x1, None, noise, 0)
    seed_t, seed_int = (default_seed(x1.device), 0) if seed is None else seed_args(op, seed, x1.device)
    if cosine_weight:
        return _loss_fwd_op(pred, x1, seed_t, None, sample_offset, seed_int, rounds, cosine_weight)
    return _loss_fwd_op(pred, x1, seed_t, None, sample_offset, seed_int, rounds)


def flow_matching_noise(
    seed: int | torch.Tensor,
    shape: tuple[int, ...],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    sample_offset: int = 0,
    philox_rounds: int = PHILOX_ROUNDS,
) -> torch.Tensor:
    """The x0 of ``shape`` (B, ...) that the Triton path generates for ``seed``, ``sample_offset``
    and ``philox_rounds`` (small kernel, same noise functions); with ``sample_offset=i`` it is rows
    ``i:i+B`` of the x0 of a larger batch with the same per-sample shape."""
    op = "flow_matching_noise"
    if len(shape) < 1:
        raise ValueError(f"{op}: `shape` must have a batch dim (B, ...), got {tuple(shape)}")
    device = (
        torch.device(device)
        if device is not None
        else (seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu"))
    )
    resolve_backend(op, "triton", torch.empty(0, device=device))
    seed_t, seed_int = seed_args(op, seed, device)
    B = int(shape[0])
    M = 1
    for d in shape[1:]:
        M *= int(d)
    check_flow_row(op, M)
    check_sample_offset(op, sample_offset, B)
    rounds = check_rounds(op, philox_rounds)
    return launch_flow_noise(seed_t, seed_int, B, M, device, dtype, sample_offset, rounds).view(*shape)
