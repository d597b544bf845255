"""Fused distance-matrix alignment loss (VA-VAE's marginal distance-matrix term):
``mean over b, i, j of relu(|cos(s_i, s_j) - cos(t_i, t_j)| - margin)``.

Chain: :mod:`rectok_fast.kernels.distmat` (Triton, ``tl.dot`` tiles) ->
``rectok_fast::distmat_align_fwd`` / ``rectok_fast::distmat_align_bwd`` (``torch.library.custom_op``
+ fake + autograd) -> :func:`distmat_align_loss` (validation, backend choice).  The forward keeps
only the fp32 row norms (B, N) of both inputs (a by-product of its tiles); no B·N² cosine matrix is
written in either pass.
"""

from __future__ import annotations

import math

import torch

from .. import reference
from .._backend import kernels, resolve_backend, triton_interpret
from .._constants import FLOAT_DTYPES, KERNEL_DTYPES
from .._validate import check_real, check_same_device, check_tensor
from ._launch import cdiv, next_power_of_2

OP = "distmat_align_loss"
EPS = 1e-8
# fp32 inputs: exact fp32 products on the FMA units (tf32 would break the fp32 error rule);
# fp16/bf16 inputs run on the tensor cores (precision None: Triton's default).
FP32_DOT_PRECISION = "ieee"


def distmat_tile_config(N: int, D: int, Dt: int, dtype_s=torch.bfloat16, dtype_t=torch.bfloat16) -> dict:
    """Tile sizes and warps of the distmat kernels for N tokens, feature widths D, Dt and the inputs' dtypes.

    Every block is >= 16 (``tl.dot``'s minimum).  A GPU target uses 64×64 cosine tiles, 8 warps and
    64-wide feature chunks for 16-bit inputs, 32-wide for fp32 (the widest without spills in the
    compile-only sm_90 report: fp32 tiles take twice the registers and shared memory).  The CPU
    interpreter, where a program costs about the same whatever its size, takes up to 128-row tiles
    and 256-wide chunks."""
    interp = triton_interpret()
    cap_n = 128 if interp else 64

    def cap_d(dtype):
        return 256 if interp else (32 if dtype == torch.float32 else 64)

    block_n = max(16, min(cap_n, next_power_of_2(max(N, 1))))
    return {
        "BLOCK_I": block_n,
        "BLOCK_J": block_n,
        "BLOCK_D": max(16, min(cap_d(dtype_s), next_power_of_2(max(D, 1)))),
        "BLOCK_DT": max(16, min(cap_d(dtype_t), next_power_of_2(max(Dt, 1)))),
        "num_warps": 8,
    }


def _dot_flags(student: torch.Tensor, teacher: torch.Tensor) -> dict:
    """``tl.dot`` precision per operand, and the interpreter's bf16 workaround (fp32 dots)."""
    flags = {}
    for side, x in (("S", student), ("T", teacher)):
        upcast = triton_interpret() and x.dtype == torch.bfloat16
        flags[f"UPCAST_{side}"] = upcast
        flags[f"PREC_{side}"] = FP32_DOT_PRECISION if (x.dtype == torch.float32 or upcast) else None
    return flags


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _n_programs(work_items: int, device: torch.device) -> int:
    """Persistent grid of the backward: two programs per SM (at most 4 in the interpreter).  Without a
    visible GPU (the compile-only report) the H100/H200 count of 132 SMs is assumed."""
    if triton_interpret():
        return max(1, min(work_items, 4))
    if device.type == "cuda" and torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 132
    return max(1, min(work_items, 2 * sms))


# ----------------------------------------------------------------------------- registered ops


@torch.library.custom_op("rectok_fast::distmat_align_fwd", mutates_args=())
def distmat_align_fwd(
    student: torch.Tensor, teacher: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """student (B, N, D), teacher (B, N, Dt) -> (loss 0-dim fp32, student norms (B, N) fp32, teacher norms (B, N) fp32)."""
    B, N, D = student.shape
    Dt = teacher.shape[2]
    ns = torch.empty((B, N), dtype=torch.float32, device=student.device)
    nt = torch.empty((B, N), dtype=torch.float32, device=student.device)
    if B * N == 0:
        return torch.full((), math.nan, dtype=torch.float32, device=student.device), ns, nt
    cfg = distmat_tile_config(N, D, Dt, student.dtype, teacher.dtype)
    n_tiles = cdiv(N, cfg["BLOCK_I"])
    part = torch.empty((B, n_tiles, n_tiles), dtype=torch.float32, device=student.device)
    kernels("distmat").distmat_fwd_kernel[(n_tiles, n_tiles, B)](
        student,
        teacher,
        ns,
        nt,
        part,
        N,
        D,
        Dt,
        *_strides(student),
        *_strides(teacher),
        float(margin),
        EPS,
        **_dot_flags(student, teacher),
        **cfg,
    )
    return part.sum() / float(B * N * N), ns, nt


@distmat_align_fwd.register_fake
def _(student, teacher, margin):
    B, N = student.shape[:2]
    f32 = torch.float32
    return student.new_empty((), dtype=f32), student.new_empty((B, N), dtype=f32), student.new_empty((B, N), dtype=f32)


@torch.library.custom_op("rectok_fast::distmat_align_bwd", mutates_args=())
def distmat_align_bwd(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_norms: torch.Tensor,
    teacher_norms: torch.Tensor,
    margin: float,
    grad_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad: 0-dim -> (dstudent (B, N, D) in student's dtype, dteacher (B, N, Dt) or (0,) unless grad_target)."""
    B, N, D = student.shape
    Dt = teacher.shape[2]
    ds = torch.empty((B, N, D), dtype=student.dtype, device=student.device)
    dt = torch.empty((B, N, Dt) if grad_target else (0,), dtype=teacher.dtype, device=teacher.device)
    if B * N == 0:
        return ds, dt
    cfg = distmat_tile_config(N, D, Dt, student.dtype, teacher.dtype)
    items = B * cdiv(N, cfg["BLOCK_I"])
    nprog = _n_programs(items, student.device)
    n_pad = cdiv(N, cfg["BLOCK_J"]) * cfg["BLOCK_J"]
    w_s = torch.empty((nprog, cfg["BLOCK_I"], n_pad), dtype=student.dtype, device=student.device)
    w_t = torch.empty(
        (nprog, cfg["BLOCK_I"], n_pad) if grad_target else (1,), dtype=teacher.dtype, device=student.device
    )
    # d loss / d cos_s[i, j] = sign·active / (B N²); both (i, j) and (j, i) reach row i: factor 2
    scale = (grad.float() * (2.0 / float(B * N * N))).contiguous()
    kernels("distmat").distmat_bwd_kernel[(nprog,)](
        student,
        teacher,
        student_norms,
        teacher_norms,
        scale,
        w_s,
        w_t,
        ds,
        dt if grad_target else ds,  # dummy pointer when GRAD_TARGET=False
        B,
        N,
        n_pad,
        D,
        Dt,
        *_strides(student),
        *_strides(teacher),
        float(margin),
        EPS,
        GRAD_TARGET=grad_target,
        **_dot_flags(student, teacher),
        **cfg,
    )
    return ds, dt


@distmat_align_bwd.register_fake
def _(grad, student, teacher, student_norms, teacher_norms, margin, grad_target):
    return student.new_empty(student.shape), teacher.new_empty(teacher.shape if grad_target else (0,))


def _setup_context(ctx, inputs, output):
    student, teacher, margin = inputs
    _, ns, nt = output
    ctx.save_for_backward(student, teacher, ns, nt)
    ctx.margin = margin
    ctx.mark_non_differentiable(ns, nt)


def _backward(ctx, grad_loss, grad_ns, grad_nt):
    student, teacher, ns, nt = ctx.saved_tensors
    grad_target = bool(ctx.needs_input_grad[1])
    ds, dt = distmat_align_bwd(grad_loss, student, teacher, ns, nt, ctx.margin, grad_target)
    return ds, (dt if grad_target else None), None


distmat_align_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional


def check_margin(op: str, margin: object) -> float:
    """``margin`` as a float; ``TypeError`` unless a real number, ``ValueError`` unless finite and >= 0."""
    margin = check_real(op, "margin", margin)
    if not (math.isfinite(margin) and margin >= 0.0):
        raise ValueError(f"{op}: `margin` must be finite and >= 0, got {margin}")
    return margin


def distmat_align_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    margin: float = 0.0,
    *,
    grad_target: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``mean over b, i, j of relu(|cos(s_i, s_j) - cos(t_i, t_j)| - margin)``, a 0-dim fp32 tensor.

    VA-VAE's marginal distance-matrix term: each sample's token-to-token cosine matrix of the
    student features should match the teacher's up to ``margin``.  The N×N matrices are never
    materialised on the Triton path.

    Args:
        student: (B, N, D) features (fp16, bf16, fp32 or fp64), e.g. projected latents.
        teacher: (B, N, Dt) features on the same device; Dt may differ from D, dtype may differ.
        margin: pairs with ``|cos_s − cos_t| <= margin`` contribute 0 (and no gradient); >= 0.
        grad_target: also differentiate with respect to ``teacher`` (detached otherwise).
        backend: ``"auto"`` (Triton on CUDA tensors, else the PyTorch reference), ``"triton"`` or
            ``"reference"``; :func:`rectok_fast.last_backend` says which ran.  fp64 inputs run the
            reference under ``"auto"``.

    Rows are normalised by their norm clamped to 1e-8; cosines are accumulated in fp32.  The mean
    divides by B·N² (NaN when B·N = 0, as the reference's empty mean).
    """
    check_tensor(OP, "student", student, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(OP, "teacher", teacher, ndim=3, dtypes=FLOAT_DTYPES)
    if tuple(teacher.shape[:2]) != tuple(student.shape[:2]):
        raise ValueError(
            f"{OP}: `teacher` must have shape (B, N, Dt) = ({student.shape[0]}, {student.shape[1]}, Dt) "
            f"like `student` {tuple(student.shape)}, got {tuple(teacher.shape)}"
        )
    check_same_device(OP, student=student, teacher=teacher)
    margin = check_margin(OP, margin)
    chosen = resolve_backend(OP, backend, student, teacher, kernel_dtypes=KERNEL_DTYPES)
    if chosen == "reference":
        return reference.distmat_align_loss(student, teacher, margin, grad_target=grad_target)
    loss, _, _ = distmat_align_fwd(student, teacher if grad_target else teacher.detach(), margin)
    return loss


def distmat_align_flops(B: int, N: int, D: int, Dt: int, *, backward: bool = False, grad_target: bool = False) -> dict:
    """Predicted matmul FLOPs (2 per multiply-add) of the Triton kernels (a prediction, not a measurement).

    Forward: the j >= i cosine tiles only, ``2·B·T(T+1)/2·BLOCK²·(D + Dt)`` with T tiles per side
    (≈ B·N²·(D + Dt) for large N).  Backward: both Gram tiles of every (i, j) again,
    ``2·B·N²·(D + Dt)``, plus ``G·Ŝ``: ``2·B·N²·D`` (and ``2·B·N²·Dt`` with ``grad_target``).
    ``minimum`` is the same count without tile padding and with a symmetric forward."""
    cfg = distmat_tile_config(N, D, Dt)
    T = cdiv(N, cfg["BLOCK_I"])
    pad = T * cfg["BLOCK_I"]
    fwd = 2.0 * B * (T * (T + 1) // 2) * cfg["BLOCK_I"] * cfg["BLOCK_J"] * (D + Dt)
    fwd_min = 1.0 * B * N * (N + 1) * (D + Dt)
    bwd = 2.0 * B * pad * pad * (D + Dt) + 2.0 * B * pad * pad * (D + (Dt if grad_target else 0))
    bwd_min = 2.0 * B * N * N * (D + Dt) + 2.0 * B * N * N * (D + (Dt if grad_target else 0))
    if not backward:
        return {"flops": fwd, "minimum": fwd_min}
    return {"flops": fwd + bwd, "minimum": fwd_min + bwd_min}


__all__ = ["distmat_align_bwd", "distmat_align_flops", "distmat_align_fwd", "distmat_align_loss", "distmat_tile_config"]
