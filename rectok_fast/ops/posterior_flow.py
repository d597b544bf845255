"""Fused posterior sample + forward-flow interpolation + KL (SPEC §2) with in-kernel Philox noise.

Chain: :mod:`rectok_fast.kernels.posterior_flow` (Triton) -> launchers below -> registered ops
``rectok_fast::posterior_flow`` / ``rectok_fast::posterior_flow_backward`` (fake + autograd) ->
the functional :func:`posterior_flow`.

With ``seed`` the two noise tensors are generated inside the kernel from a Philox stream (element
``e = (b·N + n)·C + c``, ε₁ and ε₂ from disjoint output words of the Philox call at counter ``e``;
see the kernel module) and regenerated in the backward from the same seed: no (B, N, C) noise
tensor is ever stored.  :func:`flow_noise` materialises that stream, so
``posterior_flow(seed=s)`` equals the reference given ``noise=flow_noise(s, ...)``.

``sample_offset`` (the global index of this batch's first sample) shifts the Philox counters by
``sample_offset·N·C`` so that sample ``b`` draws the numbers of global sample ``b + sample_offset``:
for a global batch split across ranks, ``posterior_flow(m[i:j], t[i:j], seed=s, sample_offset=i)``
equals ``posterior_flow(m, t, seed=s)`` restricted to rows ``i:j``, bit for bit (forward and
backward; the KL is per sample).

The reference path (``backend="reference"`` or CPU tensors under ``"auto"``) draws its noise with
``torch.randn`` from a ``torch.Generator`` seeded with ``seed``: a *different* stream from the
Triton one (same distribution, different numbers), which cannot be offset, so it rejects
``sample_offset != 0`` (pass explicit ``noise`` there, or use the Triton path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rectok_fast._backend import resolve_triton_backend, triton_interpret
from rectok_fast._moved import moved_names
from rectok_fast._validate import FLOAT_DTYPES, check_same_device, check_tensor
from rectok_fast.kernels.posterior_flow import (
    normal_pair_kernel,
    posterior_flow_bwd_kernel,
    posterior_flow_fwd_kernel,
)
from rectok_fast.reference.posterior_flow import posterior_flow as _ref_posterior_flow

__all__ = ["flow_noise", "posterior_flow"]

# the flow-time helpers moved to rectok_fast.schedules
__getattr__ = moved_names(
    __name__, dict.fromkeys(("default_shift", "sample_time", "shift_time"), "rectok_fast.schedules")
)

_OP = "posterior_flow"
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


# ----------------------------------------------------------------------------- helpers


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tiles(N: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps).  Under the interpreter big tiles keep the program count low."""
    if triton_interpret():
        block_c = min(triton.next_power_of_2(C), 1024)
        block_n = max(1, min(triton.next_power_of_2(N), 16384 // block_c))
        return block_n, block_c, 4
    block_c = min(triton.next_power_of_2(C), 128)
    block_n = max(1, min(triton.next_power_of_2(N), 2048 // block_c))
    return block_n, block_c, 4


def _grid(B: int, N: int, C: int, block_n: int, block_c: int) -> tuple[int, int, int]:
    nb, cb = triton.cdiv(N, block_n), triton.cdiv(C, block_c)
    return B * nb, cb, nb * cb  # grid0, grid1, partials per sample


def seed_tensor(op: str, seed, device: torch.device) -> torch.Tensor:
    """``seed`` (python int or a 1-element integer tensor) as a (1,) int64 tensor on ``device``."""
    if isinstance(seed, bool):
        raise TypeError(f"{op}: `seed` must be an int or an integer tensor, got bool")
    if isinstance(seed, int):
        if not -(2**63) <= seed < 2**63:
            raise ValueError(f"{op}: `seed` must fit in int64, got {seed}")
        return torch.tensor([seed], dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype not in _INT_DTYPES:
            raise TypeError(f"{op}: `seed` tensor must have an integer dtype, got {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"{op}: `seed` tensor must have exactly one element, got shape {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"{op}: `seed` is on {seed.device} but the data is on {device}")
        return seed.reshape(1).to(torch.int64)
    raise TypeError(f"{op}: `seed` must be an int or an integer tensor, got {type(seed).__name__}")


def default_seed(device: torch.device) -> torch.Tensor:
    """A fresh (1,) int64 seed drawn from torch's default generator on ``device`` (no host sync)."""
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64)


def reference_generator(seed, device: torch.device) -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (host sync for a tensor seed)."""
    if seed is None:
        return None
    s = int(seed.reshape(-1)[0].item()) if isinstance(seed, torch.Tensor) else int(seed)
    g = torch.Generator(device=device)
    g.manual_seed(s % 2**64)
    return g


def check_sample_offset(op: str, sample_offset, batch: int, per_sample: int) -> int:
    """Validate ``sample_offset`` (a non-negative int, or a SymInt under compile) and return the
    Philox counter offset ``sample_offset·per_sample``; the last counter must fit in int64."""
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, (int, torch.SymInt)):
        raise TypeError(f"{op}: `sample_offset` must be an int, got {type(sample_offset).__name__}")
    if sample_offset < 0:
        raise ValueError(f"{op}: `sample_offset` must be >= 0, got {sample_offset}")
    if (sample_offset + batch) * per_sample > 2**63 - 1:
        raise ValueError(
            f"{op}: `sample_offset`={sample_offset} puts the Philox counters past int64 "
            f"({batch} samples of {per_sample} elements)"
        )
    return sample_offset * per_sample


def check_offset_usage(op: str, sample_offset, noise_given: bool, chosen: str) -> None:
    """``sample_offset`` only shifts the seeded Triton stream: reject it where it would be ignored."""
    if isinstance(sample_offset, int) and sample_offset == 0:
        return
    if noise_given:
        raise ValueError(f"{op}: `sample_offset` applies to seeded in-kernel noise; it cannot offset explicit `noise`")
    if chosen == "reference":
        raise ValueError(
            f"{op}: `sample_offset` != 0 is only supported on the Triton path (the reference path draws "
            "its noise from a torch.Generator stream that cannot be offset); pass explicit `noise` instead"
        )


def launch_normal_stream(seed: torch.Tensor, numel: int, device, dtype: torch.dtype, two: bool, e_off: int = 0):
    """Materialise ``numel`` elements of the Philox normal stream(s) starting at counter ``e_off``."""
    a = torch.empty(numel, device=device, dtype=dtype)
    b = torch.empty(numel if two else 0, device=device, dtype=dtype)
    if numel == 0:
        return a, b
    block = 16384 if triton_interpret() else 1024
    normal_pair_kernel[(triton.cdiv(numel, block),)](seed, a, b if two else a, numel, int(e_off), TWO=two, BLOCK=block)
    return a, b


# ----------------------------------------------------------------------------- launchers


def _fwd_launch(moments, t, seed, eps1, eps2, gamma: float, sample: bool, offset: int = 0):
    B, N, C2 = moments.shape
    C = C2 // 2
    has_noise = eps2 is not None
    z = torch.empty((B, N, C), device=moments.device, dtype=moments.dtype)
    zt = torch.empty_like(z)
    block_n, block_c, warps = _tiles(N, C)
    g0, g1, P = _grid(B, N, C, block_n, block_c)
    kl_part = torch.empty((B, P), device=moments.device, dtype=torch.float32)
    if B * N * C == 0:
        return z, zt, torch.zeros(B, device=moments.device, dtype=torch.float32)
    dummy = z
    posterior_flow_fwd_kernel[(g0, g1)](
        moments,
        t.contiguous(),
        seed if seed is not None else dummy,
        eps1.contiguous() if (has_noise and sample) else dummy,
        eps2.contiguous() if has_noise else dummy,
        z,
        zt,
        kl_part,
        N,
        C,
        P,
        int(offset) * N * C,
        float(gamma),
        *moments.stride(),
        HAS_NOISE=has_noise,
        SAMPLE=sample,
        ACC=_acc(moments.dtype),
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        num_warps=warps,
        # No mul+add -> FMA contraction: z_t is then bit-identical to the eager reference given the
        # same noise (the golden ``flow_zt``); the op is memory-bound, FMAs would not make it faster.
        enable_fp_fusion=False,
    )
    return z, zt, kl_part.sum(1)


def _bwd_launch(grad_z, grad_zt, grad_kl, moments, t, seed, eps1, eps2, gamma: float, sample: bool, offset: int = 0):
    B, N, C2 = moments.shape
    C = C2 // 2
    has_noise = eps2 is not None
    dmoments = torch.empty((B, N, C2), device=moments.device, dtype=moments.dtype)
    block_n, block_c, warps = _tiles(N, C)
    g0, g1, P = _grid(B, N, C, block_n, block_c)
    dt_part = torch.empty((B, P), device=moments.device, dtype=torch.float32)
    if B * N * C == 0:
        return dmoments, torch.zeros_like(t)
    dummy = dmoments
    posterior_flow_bwd_kernel[(g0, g1)](
        moments,
        t.contiguous(),
        seed if seed is not None else dummy,
        eps1.contiguous() if (has_noise and sample) else dummy,
        eps2.contiguous() if has_noise else dummy,
        grad_z.contiguous(),
        grad_zt.contiguous(),
        grad_kl.contiguous(),
        dmoments,
        dt_part,
        N,
        C,
        P,
        int(offset) * N * C,
        float(gamma),
        *moments.stride(),
        HAS_NOISE=has_noise,
        SAMPLE=sample,
        ACC=_acc(moments.dtype),
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return dmoments, dt_part.sum(1).to(t.dtype)


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("rectok_fast::posterior_flow", mutates_args=())
def _posterior_flow_op(
    moments: torch.Tensor,
    t: torch.Tensor,
    seed: torch.Tensor | None,
    eps1: torch.Tensor | None,
    eps2: torch.Tensor | None,
    gamma: float,
    sample_posterior: bool,
    sample_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_launch(moments, t, seed, eps1, eps2, gamma, sample_posterior, sample_offset)


@_posterior_flow_op.register_fake
def _(moments, t, seed, eps1, eps2, gamma, sample_posterior, sample_offset=0):
    B, N, C2 = moments.shape
    z = moments.new_empty((B, N, C2 // 2))
    return z, torch.empty_like(z), moments.new_empty((B,), dtype=torch.float32)


@torch.library.custom_op("rectok_fast::posterior_flow_backward", mutates_args=())
def _posterior_flow_backward_op(
    grad_z: torch.Tensor,
    grad_zt: torch.Tensor,
    grad_kl: torch.Tensor,
    moments: torch.Tensor,
    t: torch.Tensor,
    seed: torch.Tensor | None,
    eps1: torch.Tensor | None,
    eps2: torch.Tensor | None,
    gamma: float,
    sample_posterior: bool,
    sample_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd_launch(grad_z, grad_zt, grad_kl, moments, t, seed, eps1, eps2, gamma, sample_posterior, sample_offset)


@_posterior_flow_backward_op.register_fake
def _(grad_z, grad_zt, grad_kl, moments, t, seed, eps1, eps2, gamma, sample_posterior, sample_offset=0):
    return moments.new_empty(moments.shape), torch.empty_like(t)


def _setup_context(ctx, inputs, output):
    moments, t, seed, eps1, eps2, gamma, sample_posterior, sample_offset = inputs
    ctx.save_for_backward(moments, t, seed, eps1, eps2)
    ctx.gamma, ctx.sample_posterior, ctx.sample_offset = gamma, sample_posterior, sample_offset


def _backward(ctx, grad_z, grad_zt, grad_kl):
    moments, t, seed, eps1, eps2 = ctx.saved_tensors
    B, N, C2 = moments.shape
    if grad_z is None:
        grad_z = moments.new_zeros((B, N, C2 // 2))
    if grad_zt is None:
        grad_zt = moments.new_zeros((B, N, C2 // 2))
    if grad_kl is None:
        grad_kl = moments.new_zeros((B,), dtype=torch.float32)
    dmoments, dt = _posterior_flow_backward_op(
        grad_z, grad_zt, grad_kl, moments, t, seed, eps1, eps2, ctx.gamma, ctx.sample_posterior, ctx.sample_offset
    )
    return dmoments, dt, None, None, None, None, None, None


_posterior_flow_op.register_autograd(_backward, setup_context=_setup_context)


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior sample, forward-flow interpolation and per-sample KL in one pass.

    Args:
        moments: (B, N, 2C) encoder output; ``mean = moments[..., :C]``, ``logvar = moments[..., C:]``
            clamped to [-30, 20].  Any strides; fp32/bf16/fp16/fp64.
        t: (B,) flow time per sample (t = 1 is pure noise); gradients flow to it.
        gamma: noise scale of the flow (1 in stage 1, 0 disables the flow noise).
        noise: optional explicit ``(eps_post, eps_flow)``, each (B, N, C) (no gradient).
        seed: python int or 1-element integer tensor (a tensor avoids recompiles and host syncs).
            Exactly one of ``noise`` / ``seed`` may be given; with neither a seed is drawn from
            torch's default generator on the device of ``moments`` (``torch.randint``, no sync).
        sample_posterior: ``z = mean + std·eps_post`` when True, ``z = mean`` otherwise.
        sample_offset: global index of this batch's first sample (>= 0): sample ``b`` draws the
            in-kernel noise of global sample ``b + sample_offset``, so a rank's slice ``[i:j]`` of a
            global batch called with ``sample_offset=i`` reproduces the whole batch's rows ``i:j``.
            Applies to the seeded Triton stream only: nonzero with ``noise`` or on the reference
            path raises ``ValueError``.
        backend: ``"auto"`` | ``"triton"`` | ``"reference"``.  The reference path draws its noise
            from a ``torch.Generator`` seeded with ``seed``, which is not the Triton stream.

    Returns:
        ``z`` (B, N, C), ``z_t = (1 − t)·z + t·gamma·eps_flow`` (B, N, C), both in ``moments.dtype``,
        and ``kl = 0.5·Σ_{N,C}(mean² + var − 1 − logvar)`` (B,) fp32.
    """
    _validate(moments, t, noise, seed)
    B, N, C2 = moments.shape
    check_sample_offset(_OP, sample_offset, B, N * (C2 // 2))
    t = t.reshape(-1)
    chosen = resolve_triton_backend(_OP, backend, moments, t)
    check_offset_usage(_OP, sample_offset, noise is not None, chosen)
    if chosen == "reference":
        gen = reference_generator(seed, moments.device) if noise is None else None
        return _ref_posterior_flow(moments, t, gamma, noise=noise, generator=gen, sample_posterior=sample_posterior)
    if noise is not None:
        eps1, eps2 = noise
        return _posterior_flow_op(moments, t, None, eps1, eps2, float(gamma), bool(sample_posterior), 0)
    s = default_seed(moments.device) if seed is None else seed_tensor(_OP, seed, moments.device)
    return _posterior_flow_op(moments, t, s, None, None, float(gamma), bool(sample_posterior), sample_offset)


def flow_noise(
    seed: int | torch.Tensor,
    shape: tuple[int, int, int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    sample_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(eps_post, eps_flow)`` (each ``shape`` = (B, N, C)) that the Triton path of
    :func:`posterior_flow` generates for ``seed`` and ``sample_offset``; materialised by a small
    kernel with the same Philox formula (runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``).
    ``flow_noise(s, (j - i, N, C), sample_offset=i)`` is rows ``i:j`` of ``flow_noise(s, (B, N, C))``."""
    if len(shape) != 3:
        raise ValueError(f"flow_noise: `shape` must be (B, N, C), got {tuple(shape)}")
    device = (
        torch.device(device)
        if device is not None
        else (seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu"))
    )
    resolve_triton_backend("flow_noise", "triton", torch.empty(0, device=device))
    s = seed_tensor("flow_noise", seed, device)
    e_off = check_sample_offset("flow_noise", sample_offset, int(shape[0]), int(shape[1]) * int(shape[2]))
    numel = int(shape[0]) * int(shape[1]) * int(shape[2])
    a, b = launch_normal_stream(s, numel, device, dtype, two=True, e_off=e_off)
    return a.view(*shape), b.view(*shape)
