"""Fused posterior sample + forward-flow interpolation + KL (method §2) with in-kernel Philox noise.

Chain: :mod:`rectok_fast.kernels.posterior_flow` (Triton) -> launchers below -> registered ops
``rectok_fast::posterior_flow_fwd`` / ``rectok_fast::posterior_flow_bwd`` (fake + autograd) ->
the functional :func:`posterior_flow`.

With ``seed`` the two noise tensors are generated inside the kernel (noise stream
``NOISE_STREAM_VERSION`` = 2 of :mod:`rectok_fast.kernels.philox`: one Philox-4x32 call per
(global sample, token pair, channel) gives both noises of two tokens) and regenerated in the
backward from the same seed: no (B, N, C) noise tensor is ever stored.  :func:`flow_noise`
materialises that stream, so ``posterior_flow(seed=s)`` equals the reference given
``noise=flow_noise(s, ...)``, bit for bit on one platform.  A Python ``int`` seed is a kernel
scalar (no copy, no sync, no recompile); a tensor seed is read on the device.

``sample_offset`` (the global index of this batch's first sample) keys the counters by the global
sample ``b + sample_offset``: for a global batch split across ranks,
``posterior_flow(m[i:j], t[i:j], seed=s, sample_offset=i)`` equals ``posterior_flow(m, t, seed=s)``
restricted to rows ``i:j``, bit for bit (forward and backward; the KL is per sample).

Nothing is computed for outputs nobody asked for: ``return_z=False`` neither computes nor stores
``z``; a backward without a gradient for ``z`` (or ``kl``, or with ``t`` not requiring grad)
neither allocates a zero gradient nor reads one, and without ``t``'s gradient the flow noise is
not even regenerated.

The reference path (``backend="reference"`` or CPU tensors under ``"auto"``) draws its noise with
``torch.randn`` from a ``torch.Generator`` seeded with ``seed``: a *different* stream from the
Triton one (same distribution, different numbers), which cannot be offset, so it rejects
``sample_offset != 0`` (pass explicit ``noise`` there, or use the Triton path).
"""

from __future__ import annotations

import torch

from .._backend import kernels, resolve_backend
from .._constants import FLOAT_DTYPES
from .._moved import moved_names
from .._validate import check_real, check_same_device, check_tensor
from ..reference.posterior_flow import posterior_flow as _ref_posterior_flow
from ._launch import acc_dtype as _acc
from ._noise import (
    NOISE_STREAM_VERSION,
    PHILOX_ROUNDS,
    batch_chunks,
    check_offset_usage,
    check_rounds,
    check_sample_offset,
    default_seed,
    launch_posterior_noise,
    noise_stream_info,
    posterior_grid,
    posterior_tiles,
    reference_generator,
    seed_args,
)

__all__ = ["NOISE_STREAM_VERSION", "flow_noise", "noise_stream_info", "posterior_flow"]

# the flow-time helpers moved to rectok_fast.schedules
__getattr__ = moved_names(
    __name__, dict.fromkeys(("default_shift", "sample_time", "shift_time"), "rectok_fast.schedules")
)

_OP = "posterior_flow"


# ----------------------------------------------------------------------------- helpers


def _moments_2d_safe(moments: torch.Tensor, block_p: int) -> torch.Tensor:
    """In-tile offsets are int32: copy a (pathologically) strided ``moments`` whose tile would span
    2**31 elements or more."""
    _, sn, sc = moments.stride()
    if (2 * block_p + 1) * abs(sn) + 2 * moments.shape[2] * abs(sc) >= 2**31:
        return moments.contiguous()
    return moments


def launch_normal_stream(seed, numel: int, device, dtype, two: bool = True, e_off: int = 0, *, shape=None):
    """Materialise the posterior stream for ``shape`` (B, N, C) (default ``(1, numel // 128, 128)``
    when 128 divides ``numel``, else ``(1, 1, numel)``); kept for the compile-only kernel report.
    Returns the flat ``(eps_post, eps_flow)``; ``e_off`` must be 0 (counters are keyed by sample)."""
    if e_off:
        raise ValueError("launch_normal_stream: counters are keyed by (sample, token pair, channel); use sample_offset")
    if shape is None:
        shape = (1, numel // 128, 128) if numel % 128 == 0 else (1, 1, numel)
    seed_t, seed_int = (seed.reshape(1).to(torch.int64), 0) if isinstance(seed, torch.Tensor) else (None, int(seed))
    a, b = launch_posterior_noise(seed_t, seed_int, shape, device, dtype, 0, PHILOX_ROUNDS)
    return a.reshape(-1), (b.reshape(-1) if two else b.new_empty(0))


# ----------------------------------------------------------------------------- launchers


def _fwd_launch(moments, t, seed, seed_int, eps1, eps2, gamma, sample, offset, return_z, rounds):
    B, N, C2 = moments.shape
    C = C2 // 2
    has_noise = eps2 is not None
    zt = torch.empty((B, N, C), device=moments.device, dtype=moments.dtype)
    z = torch.empty_like(zt) if return_z else zt.new_empty(0)
    block_p, block_c, warps = posterior_tiles(N, C)
    g0, g1, P = posterior_grid(B, N, C, block_p, block_c)
    if B * N * C == 0:
        return z, zt, torch.zeros(B, device=moments.device, dtype=torch.float32)
    kl_part = torch.empty((B, P), device=moments.device, dtype=torch.float32)
    moments = _moments_2d_safe(moments, block_p)
    t, e1, e2 = (
        t.contiguous(),
        (eps1.contiguous() if (has_noise and sample) else zt),
        (eps2.contiguous() if has_noise else zt),
    )
    for b0, nb in batch_chunks(B):
        kernels("posterior_flow").posterior_flow_fwd_kernel[(g0, g1, nb)](
            moments,
            t,
            seed if seed is not None else zt,
            e1,
            e2,
            z if return_z else zt,
            zt,
            kl_part,
            N,
            C,
            P,
            int(seed_int),
            int(offset),
            b0,
            float(gamma),
            *moments.stride(),
            HAS_NOISE=has_noise,
            SAMPLE=sample,
            FLOW=has_noise or float(gamma) != 0.0,  # generated noise is finite: γ = 0 drops it exactly
            WRITE_Z=return_z,
            SEED_IN_PTR=seed is not None,
            ROUNDS=rounds,
            ACC=_acc(moments.dtype),
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            num_warps=warps,
            # FMA contraction on (the GPU default): the interpreter never contracts, so the CPU path stays
            # bit-identical to the eager reference given the same noise (the golden ``flow_zt``); GPU
            # runs agree with it to rounding (method §6: 1e-5).  The noise uses explicit fma and does not
            # depend on this flag.
            enable_fp_fusion=True,
        )
    return z, zt, kl_part.sum(1)


def _bwd_launch(
    grad_z, grad_zt, grad_kl, moments, t, seed, seed_int, eps1, eps2, gamma, sample, offset, need_dt, rounds
):
    B, N, C2 = moments.shape
    C = C2 // 2
    has_noise = eps2 is not None
    dmoments = torch.empty((B, N, C2), device=moments.device, dtype=moments.dtype)
    dt_out = torch.zeros_like(t) if need_dt else t.new_empty(0)
    if B * N * C == 0:
        return dmoments, dt_out
    block_p, block_c, warps = posterior_tiles(N, C)
    g0, g1, P = posterior_grid(B, N, C, block_p, block_c)
    dt_part = torch.empty((B, P) if need_dt else (0,), device=moments.device, dtype=torch.float32)
    moments = _moments_2d_safe(moments, block_p)
    dummy = dmoments
    t = t.contiguous()
    e1 = eps1.contiguous() if (has_noise and sample) else dummy
    e2 = eps2.contiguous() if (has_noise and need_dt) else dummy
    gz = grad_z.contiguous() if grad_z is not None else dummy
    gzt = grad_zt.contiguous() if grad_zt is not None else dummy
    gkl = grad_kl.contiguous() if grad_kl is not None else dummy
    for b0, nb in batch_chunks(B):
        kernels("posterior_flow").posterior_flow_bwd_kernel[(g0, g1, nb)](
            moments,
            t,
            seed if seed is not None else dummy,
            e1,
            e2,
            gz,
            gzt,
            gkl,
            dmoments,
            dt_part if need_dt else dummy,
            N,
            C,
            P,
            int(seed_int),
            int(offset),
            b0,
            float(gamma),
            *moments.stride(),
            HAS_NOISE=has_noise,
            SAMPLE=sample,
            FLOW=has_noise or float(gamma) != 0.0,  # generated noise is finite: γ = 0 drops it exactly
            HAS_GZ=grad_z is not None,
            HAS_GZT=grad_zt is not None,
            HAS_GKL=grad_kl is not None,
            NEED_DT=need_dt,
            SEED_IN_PTR=seed is not None,
            ROUNDS=rounds,
            ACC=_acc(moments.dtype),
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            num_warps=warps,
        )
    return dmoments, (dt_part.sum(1).to(t.dtype) if need_dt else dt_out)


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("rectok_fast::posterior_flow_fwd", mutates_args=())
def _posterior_flow_fwd_op(
    moments: torch.Tensor,
    t: torch.Tensor,
    seed: torch.Tensor | None,
    eps1: torch.Tensor | None,
    eps2: torch.Tensor | None,
    gamma: float,
    sample_posterior: bool,
    sample_offset: int = 0,
    seed_int: int = 0,
    return_z: bool = True,
    philox_rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z or an empty tensor when not ``return_z``, z_t, kl).  The seed is ``seed`` when given,
    else ``seed_int`` (unused with explicit noise ``eps1``/``eps2``)."""
    return _fwd_launch(
        moments, t, seed, seed_int, eps1, eps2, gamma, sample_posterior, sample_offset, return_z, philox_rounds
    )


@_posterior_flow_fwd_op.register_fake
def _(
    moments,
    t,
    seed,
    eps1,
    eps2,
    gamma,
    sample_posterior,
    sample_offset=0,
    seed_int=0,
    return_z=True,
    philox_rounds=PHILOX_ROUNDS,
):
    B, N, C2 = moments.shape
    zt = moments.new_empty((B, N, C2 // 2))
    z = torch.empty_like(zt) if return_z else moments.new_empty(0)
    return z, zt, moments.new_empty((B,), dtype=torch.float32)


@torch.library.custom_op("rectok_fast::posterior_flow_bwd", mutates_args=())
def _posterior_flow_bwd_op(
    grad_z: torch.Tensor | None,
    grad_zt: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    moments: torch.Tensor,
    t: torch.Tensor,
    seed: torch.Tensor | None,
    eps1: torch.Tensor | None,
    eps2: torch.Tensor | None,
    gamma: float,
    sample_posterior: bool,
    sample_offset: int = 0,
    seed_int: int = 0,
    need_dt: bool = True,
    philox_rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dmoments, dt); a missing gradient is not read, dt is empty when not ``need_dt``."""
    return _bwd_launch(
        grad_z,
        grad_zt,
        grad_kl,
        moments,
        t,
        seed,
        seed_int,
        eps1,
        eps2,
        gamma,
        sample_posterior,
        sample_offset,
        need_dt,
        philox_rounds,
    )


@_posterior_flow_bwd_op.register_fake
def _(
    grad_z,
    grad_zt,
    grad_kl,
    moments,
    t,
    seed,
    eps1,
    eps2,
    gamma,
    sample_posterior,
    sample_offset=0,
    seed_int=0,
    need_dt=True,
    philox_rounds=PHILOX_ROUNDS,
):
    return moments.new_empty(moments.shape), (torch.empty_like(t) if need_dt else t.new_empty(0))


def _setup_context(ctx, inputs, output):
    moments, t, seed, eps1, eps2, gamma, sample_posterior, sample_offset, seed_int, return_z, rounds = inputs
    ctx.save_for_backward(moments, t, seed, eps1, eps2)
    ctx.gamma, ctx.sample_posterior, ctx.sample_offset = gamma, sample_posterior, sample_offset
    ctx.seed_int, ctx.return_z, ctx.rounds = seed_int, return_z, rounds
    # an output nobody uses gets None, not a zero tensor (no (B, N, C) zero-fill, no read of it)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_z, grad_zt, grad_kl):
    moments, t, seed, eps1, eps2 = ctx.saved_tensors
    need_dm, need_dt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not ctx.return_z:
        grad_z = None
    if (grad_z is None and grad_zt is None and grad_kl is None) or not (need_dm or need_dt):
        return None, None, None, None, None, None, None, None, None, None, None
    dmoments, dt = _posterior_flow_bwd_op(
        grad_z,
        grad_zt,
        grad_kl,
        moments,
        t,
        seed,
        eps1,
        eps2,
        ctx.gamma,
        ctx.sample_posterior,
        ctx.sample_offset,
        ctx.seed_int,
        bool(need_dt and grad_zt is not None),
        ctx.rounds,
    )
    dt = dt if (need_dt and grad_zt is not None) else None  # z and kl do not depend on t
    return dmoments if need_dm else None, dt, None, None, None, None, None, None, None, None, None


_posterior_flow_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functionals


def _validate(moments, t, noise, seed):
    check_tensor(_OP, "moments", moments, ndim=3, dtypes=FLOAT_DTYPES)
    B, N, C2 = moments.shape
    if C2 % 2:
        raise ValueError(f"{_OP}: the last dim of `moments` must be even (mean ‖ logvar), got {C2}")
    check_tensor(_OP, "t", t, dtypes=FLOAT_DTYPES)
    if t.dim() > 1 or t.numel() != B:
        raise ValueError(f"{_OP}: `t` must have shape ({B},) (one time per sample), got {tuple(t.shape)}")
    check_same_device(_OP, moments=moments, t=t)
    if noise is not None and seed is not None:
        raise ValueError(f"{_OP}: pass either `noise` or `seed`, not both")
    if noise is not None:
        if not isinstance(noise, (tuple, list)) or len(noise) != 2:
            raise TypeError(f"{_OP}: `noise` must be a pair (eps_post, eps_flow)")
        for name, e in zip(("noise[0]", "noise[1]"), noise):
            check_tensor(_OP, name, e, dtypes=FLOAT_DTYPES)
            if tuple(e.shape) != (B, N, C2 // 2):
                raise ValueError(f"{_OP}: `{name}` must have shape {(B, N, C2 // 2)}, got {tuple(e.shape)}")
        check_same_device(_OP, moments=moments, **{"noise[0]": noise[0], "noise[1]": noise[1]})


def posterior_flow(
    moments: torch.Tensor,
    t: torch.Tensor,
    gamma: float = 1.0,
    *,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int | torch.Tensor | None = None,
    sample_posterior: bool = True,
    sample_offset: int = 0,
    return_z: bool = True,
    philox_rounds: int = PHILOX_ROUNDS,
    backend: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Posterior sample, forward-flow interpolation and per-sample KL in one pass.

    Args:
        moments: (B, N, 2C) encoder output; ``mean = moments[..., :C]``, ``logvar = moments[..., C:]``
            clamped to [-30, 20] (the clamp's gradient passes where ``-30 <= logvar <= 20``,
            bounds included).  Any strides; fp32/bf16/fp16/fp64.
        t: (B,) flow time per sample (t = 1 is pure noise); gradients flow to it.
        gamma: noise scale of the flow (1 in stage 1, 0 disables the flow noise).
        noise: optional explicit ``(eps_post, eps_flow)``, each (B, N, C) (no gradient).
        seed: python int (a kernel scalar: no copy, no host sync, no kernel recompile when it
            changes; under ``torch.compile`` dynamo treats a changing int as a graph input to
            specialise or mark dynamic, and a CUDA graph bakes it in) or 1-element integer tensor
            (read on the device: the choice for compiled steps and CUDA-graph replays with a
            changing seed).  Exactly one of ``noise`` / ``seed`` may be given; with neither a seed
            is drawn from torch's default generator on the device of ``moments`` (no sync).
        sample_posterior: ``z = mean + std·eps_post`` when True, ``z = mean`` otherwise.
        sample_offset: global index of this batch's first sample (>= 0): sample ``b`` draws the
            in-kernel noise of global sample ``b + sample_offset``, so a rank's slice ``[i:j]`` of a
            global batch called with ``sample_offset=i`` reproduces the whole batch's rows ``i:j``.
            Applies to the seeded Triton stream only: nonzero with ``noise`` or on the reference
            path raises ``ValueError``.
        return_z: when False, ``z`` is neither computed into memory nor returned (``None`` in its
            place): the z_t-only mode.
        philox_rounds: Philox rounds of the in-kernel stream, 10 (default) or 7 (a different,
            cheaper stream; see :mod:`rectok_fast.kernels.philox`).
        backend: ``"auto"`` | ``"triton"`` | ``"reference"``.  The reference path draws its noise
            from a ``torch.Generator`` seeded with ``seed``, which is not the Triton stream.

    Returns:
        ``z`` (B, N, C) (``None`` when not ``return_z``), ``z_t = (1 − t)·z + t·gamma·eps_flow``
        (B, N, C), both in ``moments.dtype``, and ``kl = 0.5·Σ_{N,C}(mean² + var − 1 − logvar)``
        (B,) fp32.
    """
    _validate(moments, t, noise, seed)
    gamma = check_real(_OP, "gamma", gamma)
    B, N, C2 = moments.shape
    check_sample_offset(_OP, sample_offset, B)
    rounds = check_rounds(_OP, philox_rounds)
    t = t.reshape(-1)
    chosen = resolve_backend(_OP, backend, moments, t)
    check_offset_usage(_OP, sample_offset, noise is not None, chosen)
    if chosen == "reference":
        gen = reference_generator(seed, moments.device, _OP) if noise is None else None
        z, zt, kl = _ref_posterior_flow(
            moments, t, gamma, noise=noise, generator=gen, sample_posterior=sample_posterior
        )
        return (z if return_z else None), zt, kl
    if noise is not None:
        eps1, eps2 = noise
        out = _posterior_flow_fwd_op(moments, t, None, eps1, eps2, float(gamma), bool(sample_posterior), 0, 0, return_z)
    else:
        if seed is None:
            seed_t, seed_int = default_seed(moments.device), 0
        else:
            seed_t, seed_int = seed_args(_OP, seed, moments.device)
        out = _posterior_flow_fwd_op(
            moments,
            t,
            seed_t,
            None,
            None,
            float(gamma),
            bool(sample_posterior),
            sample_offset,
            seed_int,
            return_z,
            rounds,
        )
    z, zt, kl = out
    return (z if return_z else None), zt, kl


def flow_noise(
    seed: int | torch.Tensor,
    shape: tuple[int, int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    sample_offset: int = 0,
    philox_rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(eps_post, eps_flow)`` (each ``shape`` = (B, N, C)) that the Triton path of
    :func:`posterior_flow` generates for ``seed``, ``sample_offset`` and ``philox_rounds``;
    materialised by a small kernel with the same noise functions (runs on CUDA, or on the CPU
    under ``TRITON_INTERPRET=1``).  ``flow_noise(s, (j - i, N, C), sample_offset=i)`` is rows
    ``i:j`` of ``flow_noise(s, (B, N, C))``; the noise of (sample, token, channel) does not depend
    on N or C either."""
    if len(shape) != 3:
        raise ValueError(f"flow_noise: `shape` must be (B, N, C), got {tuple(shape)}")
    device = (
        torch.device(device)
        if device is not None
        else (seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu"))
    )
    resolve_backend("flow_noise", "triton", torch.empty(0, device=device))
    seed_t, seed_int = seed_args("flow_noise", seed, device)
    check_sample_offset("flow_noise", sample_offset, int(shape[0]))
    rounds = check_rounds("flow_noise", philox_rounds)
    return launch_posterior_noise(seed_t, seed_int, shape, device, dtype, sample_offset, rounds)
