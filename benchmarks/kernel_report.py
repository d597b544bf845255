"""Compile-only sm_90 kernel report: what the fused ops would do on an H200/H100, predicted from compiled code.

Usage::

    python -m benchmarks.kernel_report            # writes benchmarks/results/static/kernel_report.{json,md}
    python -m benchmarks.kernel_report --check    # also exit 1 if any kernel spills (CI)
    python -m benchmarks.kernel_report --readme   # also insert the table into README.md (between markers)
    python -m benchmarks.kernel_report --from-json --readme   # regenerate the tables only (no compile)
    python -m benchmarks.kernel_report --ops gaussian_kl --dtypes fp32 --out DIR   # a subset

No GPU is needed.  A stand-in Triton driver (:mod:`benchmarks._standin`) makes Triton compile for
``GPUTarget("cuda", 90, 32)``; every fused op runs through its public functional (``backend="triton"``)
and autograd on *meta* tensors that claim to be CUDA tensors, under a ``TorchDispatchMode`` that

* runs each ``rectok_fast::*`` custom op's real implementation (the launcher) instead of its fake,
* records every other aten op the launchers and autograd issue (allocations, zero-fills, partial
  sums, casts, sorts) with the bytes it moves, and
* lets every Triton launch compile (for sm_90, with the launch's exact arguments) without running.

Each compiled kernel is read back: registers, spills and stack from the ``ptxas -v`` log Triton
writes, shared memory from its metadata, SASS (``nvdisasm`` from the triton wheel) for load/store
widths and instructions executed per element (:mod:`benchmarks._sass`), TTIR for the bytes each
pointer argument moves (:mod:`benchmarks._ttir`).  ``csrc/*.cu`` is compiled with
``nvcc -Xptxas -v`` for sm_90 (the C++ patch ops).

The time model, per launch ``k`` of an op (summed over the op's launches)::

    t_k = max(bytes_k / BW_copy, thread_instructions_k / issue_rate, load_bytes_k / BW_reachable_k,
              flops_k / matrix_rate)
    t   = Σ_k t_k + launches · t_launch
    BW_reachable_k = resident warps (all SMs, capped by the grid) × load bytes in flight per warp / latency
    predicted_frac_copy_bw = bytes_min / (t · BW_copy)
    predicted_frac_matrix_rate = flops_min / (t · matrix_rate)      (compute-bound ops only: distmat)

The matrix term exists only for kernels whose op states its matmul FLOPs (``distmat_align_loss``);
``matrix_rate`` is the bf16 tensor-core rate, or for fp32 inputs whatever the kernel's ``tl.dot``
precision runs on (:func:`matrix_rate`).

with the constants in :data:`MACHINES` / :data:`MODEL` (stated in the JSON and the markdown).  These
are predictions; the README puts them beside GPU measurements when ``benchmarks/results/summary.json``
has any.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "benchmarks", "results", "static")
SUMMARY = os.path.join(ROOT, "benchmarks", "results", "summary.json")
START, END = "<!-- kernel-report:start -->", "<!-- kernel-report:end -->"

# ----------------------------------------------------------------------------- model constants

MACHINES = {
    # 132 SMs x 4 schedulers x 1.98 GHz x 32 lanes = 3.35e13 thread-instructions/s (one warp instruction
    # issued per scheduler per cycle).  BW_copy: device-to-device copy, read + write counted.
    # matrix_bf16: dense bf16 tensor-core rate the model uses for compute-bound ops (FLOP/s, 2 per
    # multiply-add): ~790 TFLOP/s, the measured-GEMM figure quoted by the issue for an H200 (989
    # datasheet), not measured here; the H100 SXM has the same GH100 compute, so the same rate is assumed.
    # matrix_tf32: 494 TFLOP/s dense datasheet (used only if the fp32 dots ran as TF32).
    "H200": {
        "sms": 132,
        "clock_hz": 1.98e9,
        "schedulers": 4,
        "bw_copy": 4.3e12,
        "bw_note": "measured copy",
        "matrix_bf16": 790e12,
        "matrix_tf32": 494e12,
        "matrix_note": "bf16 dense ~790 TFLOP/s measured GEMM (989 datasheet); TF32 dense 494 datasheet",
    },
    "H100": {
        "sms": 132,
        "clock_hz": 1.98e9,
        "schedulers": 4,
        "bw_copy": 3.0e12,
        "bw_note": "measured copy (3.35 datasheet)",
        "matrix_bf16": 790e12,
        "matrix_tf32": 494e12,
        "matrix_note": "assumed equal to the H200's (same GH100 compute)",
    },
}
MODEL = {
    "memory_latency_s": 600e-9,  # loaded DRAM latency assumed for BW_reachable
    "t_launch_s": 2.0e-6,  # GPU-side gap per kernel launch in an eager stream
    "max_warps_per_sm": 64,
    "max_blocks_per_sm": 32,
    "regs_per_sm": 65536,
    "smem_per_sm": 228 * 1024,
    "smem_reserved_per_block": 1024,
    "reg_alloc_unit": 256,  # registers are allocated per warp in units of 256
    "sort_radix_bits": 8,  # torch.sort on CUDA: cub radix sort, one pass per 8 key bits
}
SHAPES = {"B": 256, "N": 256, "C": 128, "W": 768, "D": 1024, "K": 192, "img": 256, "p": 16}
# the recipe's mask ratio r = max(0, U(-0.1, 0.4)) -> K = ceil(N (1 - r)) in [154, 256]
MASK_RATIO_RANGE = (0.0, 0.4)
SEED = 1234
DISTMAT_MARGIN = 0.25  # a float argument: its value does not change the compiled kernels


def issue_rate(m: dict) -> float:
    return m["sms"] * m["schedulers"] * m["clock_hz"] * 32


FP32_FMA_LANES_PER_SM = 128  # sm_90: 128 fp32 FMA lanes per SM


def fp32_dot_precision() -> str | None:
    """``input_precision`` the distmat kernels pass to ``tl.dot`` for fp32 inputs (read from the op)."""
    try:
        return _ops_module("distmat").FP32_DOT_PRECISION
    except Exception:
        return None


def matrix_rate(m: dict, dtn: str) -> tuple[float, str]:
    """FLOP/s of a ``tl.dot`` for inputs of dtype ``dtn`` and what it runs on.  bf16: the tensor cores
    (``matrix_bf16``).  fp32: ``input_precision="ieee"`` is exact fp32 FMA on the CUDA cores
    (SMs x 128 lanes x 2 x clock, ~66.9 TFLOP/s: the 67 datasheet); "tf32" the TF32 tensor-core rate,
    "tf32x3" a third of it."""
    if dtn != "fp32":
        return m["matrix_bf16"], "bf16 tensor cores"
    prec = fp32_dot_precision()
    if prec in ("tf32", None):  # None: Triton's default for fp32 dots is tf32
        return m["matrix_tf32"], "TF32 tensor cores"
    if prec == "tf32x3":
        return m["matrix_tf32"] / 3, "3xTF32 tensor cores"
    return m["sms"] * FP32_FMA_LANES_PER_SM * 2 * m["clock_hz"], "fp32 FMA (tl.dot input_precision='ieee')"


# ----------------------------------------------------------------------------- op descriptions


@dataclass
class Built:
    """One op call at the benchmark shapes.  ``hints`` give data-dependent loop trips for the
    benchmark's data: ``range()`` bound text -> trips, ``"*while*"`` -> trips of every ``while`` loop
    (for the token ops: ids are distinct per row, so the walk along duplicate chains never iterates)."""

    run: object  # () -> outputs (tuple or tensor)
    grad_inputs: list  # tensors to differentiate (fwd+bwd)
    grad_outputs: object  # outputs -> list of (output, grad) pairs used for backward
    bytes_fwd: int
    bytes_bwd: int
    elements: int  # the op's elements (per-element counts divide by this)
    hints: dict | None = None  # data-dependent loop bounds (range() argument text -> trips)
    flops: dict | None = None  # compute-bound ops: kernel name -> (matmul FLOPs executed, minimum FLOPs)
    # kernel name -> share of its programs that run the counted path (the others return at once)
    active_programs: dict | None = None


def _ops_module(name):
    import importlib

    return importlib.import_module(f"rectok_fast.ops.{name}")


class OpSpecs:
    """Builders of every op at the benchmark shapes (bytes_min as in benchmarks/test_bench_ops.py:
    each tensor an op must read or write once per pass, shared tables once, noise never)."""

    def __init__(self, fake):
        self.fake = fake  # (shape, dtype, grad) -> fake CUDA meta tensor

    def names(self):
        return [
            "posterior_flow",
            "posterior_flow_zt_only",
            "flow_matching_xt",
            "flow_matching_loss",
            "cosine_align_loss",
            "kl_align_loss",
            "distmat_align_loss",
            "gaussian_kl",
            "gather_tokens",
            "restore_tokens",
            "patchify",
            "unpatchify",
            "flow_noise",
        ]

    def depends_on_K(self, name):
        return name in ("gather_tokens", "restore_tokens", "patchify")

    def has_bwd(self, name):
        return name != "flow_noise"

    def build(self, name, dt, grad, K=None):
        import torch

        import rectok_fast.ops as ops

        S = dict(SHAPES)
        if K is not None:
            S["K"] = K
        B, N, C, W, D, K, img, p = (S[k] for k in ("B", "N", "C", "W", "D", "K", "img", "p"))
        s = torch.finfo(dt).bits // 8
        f = self.fake
        t = f((B,), torch.float32, False)
        bnc = B * N * C

        def all_outs(outs, n=None):
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            return [(o, f(o.shape, o.dtype, False)) for o in outs[:n] if o.requires_grad]

        if name in ("posterior_flow", "posterior_flow_zt_only"):
            m = f((B, N, 2 * C), dt, grad)
            if name == "posterior_flow":
                fwd = 2 * bnc * s + 2 * bnc * s + 8 * B
                bwd = 3 * 2 * bnc * s + 8 * B

                def gsel(outs):
                    return all_outs(outs)

            else:  # z_t and kl used downstream, z not
                fwd = 2 * bnc * s + bnc * s + 8 * B
                bwd = 2 * bnc * s + bnc * s + 2 * bnc * s + 8 * B

                def gsel(outs):
                    return [(o, f(o.shape, o.dtype, False)) for o in outs[1:] if o.requires_grad]

            # posterior_flow_zt_only asks for no z: the launcher compiles the z-less kernel (WRITE_Z=False)
            return_z = name == "posterior_flow"
            return Built(
                lambda: ops.posterior_flow(m, t, 1.0, seed=SEED, return_z=return_z, backend="triton"),
                [m],
                gsel,
                fwd,
                bwd,
                bnc,
            )
        if name == "flow_matching_xt":
            x1 = f((B, N, C), dt, grad)
            tt = f((B,), torch.float32, grad)
            return Built(
                lambda: ops.flow_matching_xt(x1, tt, seed=SEED, backend="triton"),
                [x1, tt],
                all_outs,
                2 * bnc * s + 4 * B,
                3 * bnc * s + 8 * B,  # read grad, x1; write dx1, dt
                bnc,
            )
        if name == "flow_matching_loss":
            pred = f((B, N, C), dt, grad)
            x1 = f((B, N, C), dt, False)
            return Built(
                lambda: ops.flow_matching_loss(pred, x1, t, seed=SEED, backend="triton"),
                [pred],
                all_outs,
                2 * bnc * s + 4 * B,
                3 * bnc * s + 4 * B,
                bnc,
            )
        if name in ("cosine_align_loss", "kl_align_loss"):
            a = f((B, N, D), dt, grad)
            b = f((B, N, D), dt, False)
            fn = getattr(ops, name)
            n = B * N * D
            return Built(lambda: fn(a, b, backend="triton"), [a], all_outs, 2 * n * s, 3 * n * s, n)
        if name == "distmat_align_loss":  # student (B, N, D), teacher (B, N, Dt = D) detached
            from rectok_fast.ops.distmat import distmat_align_flops, distmat_tile_config

            Dt = D
            cfg = distmat_tile_config(N, D, Dt, dt, dt)
            # the feature-chunk loops `range(0, K, BLOCK_K)` sit in @triton.jit helpers whose K (= D or Dt)
            # is not a launch argument name: their trips, the same for both inputs here (D = Dt)
            assert D // cfg["BLOCK_D"] == Dt // cfg["BLOCK_DT"]
            chunk_hints = {"K": float(math.ceil(D / cfg["BLOCK_D"]))}
            a = f((B, N, D), dt, grad)
            b = f((B, N, Dt), dt, False)
            T_ = math.ceil(N / cfg["BLOCK_I"])
            fl_f = distmat_align_flops(B, N, D, Dt)
            fl_t = distmat_align_flops(B, N, D, Dt, backward=True)
            flops = {
                "distmat_fwd_kernel": (fl_f["flops"], fl_f["minimum"]),
                "distmat_bwd_kernel": (fl_t["flops"] - fl_f["flops"], fl_t["minimum"] - fl_f["minimum"]),
            }
            return Built(
                lambda: ops.distmat_align_loss(a, b, DISTMAT_MARGIN, backend="triton"),
                [a],
                all_outs,
                B * N * (D + Dt) * s + 8 * B * N,  # read both inputs; write the fp32 row norms (B, N) x 2
                B * N * (D + Dt) * s + 8 * B * N + B * N * D * s,  # read inputs + norms; write dstudent
                B * N * D,
                hints=chunk_hints,
                flops=flops,
                # the forward's (i, j) tiles with j < i skip everything but one store of a zero partial
                active_programs={"distmat_fwd_kernel": (T_ * (T_ + 1) / 2) / (T_ * T_)},
            )
        if name == "gaussian_kl":
            mean = f((B, N, C), dt, grad)
            lv = f((B, N, C), dt, grad)
            return Built(
                lambda: ops.gaussian_kl(mean, lv, backend="triton"),
                [mean, lv],
                all_outs,
                2 * bnc * s + 4 * B,
                4 * bnc * s + 4 * B,
                bnc,
            )
        if name == "gather_tokens":
            x = f((B, N, W), dt, grad)
            pos = f((1, N, W), dt, grad)
            ids = f((B, K), torch.int64, False)
            bkw, nw = B * K * W, N * W
            return Built(
                lambda: ops.gather_tokens(x, ids, pos, backend="triton"),
                [x, pos],
                all_outs,
                (2 * bkw + nw) * s + 8 * B * K,
                (bkw + B * N * W + nw) * s + 8 * B * K,
                bkw,
                hints={"max_cnt": _segment_max_hint(B, N, K), "*while*": 0.0},
            )
        if name == "restore_tokens":
            vis = f((B, K, W), dt, grad)
            mt = f((W,), dt, grad)
            pos = f((1, N, W), dt, grad)
            ids = f((B, N), torch.int64, False)
            bkw, bnw, nw = B * K * W, B * N * W, N * W
            return Built(
                lambda: ops.restore_tokens(vis, ids, mt, pos, backend="triton"),
                [vis, mt, pos],
                all_outs,
                (bkw + nw + W + bnw) * s + 8 * B * N,
                (bnw + bkw + nw + W) * s + 8 * B * N,
                bnw,
                hints={"*while*": 0.0},
            )
        if name in ("patchify", "unpatchify"):
            if not hasattr(torch.ops.rectok_fast, "patchify"):
                return self._patch_model(name, dt, grad, S)
            if name == "patchify":
                im = f((B, 3, img, img), dt, grad)
                ids = f((B, K), torch.int64, False)
                kept = B * K * 3 * p * p
                return Built(
                    lambda: torch.ops.rectok_fast.patchify(im, p, ids),
                    [im],
                    all_outs,
                    2 * kept * s + 8 * B * K,
                    (kept + B * 3 * img * img) * s + 8 * B * K,
                    kept,
                )
            tok = f((B, N, 3 * p * p), dt, grad)
            n = B * N * 3 * p * p
            g = img // p
            return Built(
                lambda: torch.ops.rectok_fast.unpatchify(tok, p, 3, g, g, None),
                [tok],
                all_outs,
                2 * n * s,
                2 * n * s,
                n,
            )
        if name == "flow_noise":  # the noise-materialising kernel (flow_noise: eps_post and eps_flow)
            # flow_noise() checks for a CUDA device before it launches; its launcher takes the device
            launch = getattr(_ops_module("posterior_flow"), "launch_normal_stream", None)
            if launch is None:
                raise RuntimeError("rectok_fast.ops.posterior_flow.launch_normal_stream (the noise launcher) not found")
            seed = f((1,), torch.int64, False)
            return Built(
                lambda: launch(seed, bnc, torch.device("meta"), dt, True),
                [],
                all_outs,
                2 * bnc * s,
                0,
                bnc,
            )
        raise KeyError(name)

    def _patch_model(self, name, dt, grad, S):
        """The patch ops when the C++ extension is not loaded in this environment: the same events
        (copy kernel, zero-fill) from the shapes, without dispatching (noted in the op's report)."""
        import torch

        B, N, K, img, p = (S[k] for k in ("B", "N", "K", "img", "p"))
        s = torch.finfo(dt).bits // 8
        e = lambda *shape, d=dt: torch.empty(shape, device="meta", dtype=d)  # noqa: E731
        image, ids = e(B, 3, img, img), e(B, K, d=torch.int64)
        if name == "patchify":
            tok = e(B, K, 3 * p * p)
            fwd = _patch_events("patchify", image, tok, ids)
            bwd = _patch_events("unpatchify", image, tok, ids)
            kept = B * K * 3 * p * p
            bmin = (2 * kept * s + 8 * B * K, (kept + B * 3 * img * img) * s + 8 * B * K)
        else:
            tok = e(B, N, 3 * p * p)
            fwd = _patch_events("unpatchify", image, tok, None)
            bwd = _patch_events("patchify", image, tok, None)
            bmin = (2 * tok.numel() * s, 2 * tok.numel() * s)

        def run():
            Capture.current.events.extend(fwd + (bwd if grad else []))
            Capture.current.events.append(
                {
                    "kind": "note",
                    "name": "modelled from shapes",
                    "bytes": 0,
                    "launches": 0,
                    "note": "rectok_fast._C not loaded here: C++ calls modelled, not dispatched",
                }
            )

        return Built(run, [], lambda outs: [], bmin[0], bmin[1], tok.numel())


def _segment_max_hint(B, N, K):
    """Trips of the gather backward's segment-sum loop ``range(0, max_cnt)``: the mean over 16-row
    blocks of the largest number of sources per destination row, for ids drawn as the benchmark
    draws them (a random K of N per sample).  Per-sample rows get 0 or 1 source; a shared table's
    row gets Binomial(B, K/N)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.argsort(torch.rand(B, N, generator=g), dim=1)[:, :K]
    counts = torch.bincount(ids.reshape(-1), minlength=N).float()
    shared = counts.reshape(-1, 16).max(1).values.mean().item() if N % 16 == 0 else counts.max().item()
    return {"shared": shared, "per_sample": 1.0}


# ----------------------------------------------------------------------------- capture


def _fake_cuda_cls():
    import torch

    class FakeCuda(torch.Tensor):
        """A meta tensor that answers ``is_cuda`` with True, so the functionals pick the Triton path."""

        @property
        def is_cuda(self):
            return True

    return FakeCuda


def _make_fake():
    import torch

    FakeCuda = _fake_cuda_cls()

    def fake(shape, dtype, grad):
        t = torch.empty(tuple(shape), device="meta", dtype=dtype)
        return torch.Tensor._make_subclass(FakeCuda, t, bool(grad))

    return fake


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


_ZERO_COST = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "lift_fresh",
    "_unsafe_view",
    "view",
    "reshape",
    "expand",
    "as_strided",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "t",
    "transpose",
    "permute",
    "_reshape_alias",
    "unbind",
    "split",
    "chunk",
    "set_",
    "resize_",
    "_to_copy_noop",
}
_WRITE_ONLY = {
    "zero_",
    "fill_",
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "full",
    "full_like",
    "new_zeros",
    "new_ones",
    "new_full",
    "arange",
    "scalar_tensor",
    "rand",
    "randn",
    "randint",
    "normal_",
    "uniform_",
}


def _aten_event(func, args, kwargs, out):
    import torch
    from torch.utils._pytree import tree_flatten

    name = func._schema.name.split("::")[-1]
    if name in _ZERO_COST or getattr(func, "is_view", False):
        return None
    ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
    if not ins and not outs:  # e.g. promote_types: no tensor, no kernel
        return None
    if name == "_local_scalar_dense":
        return {"kind": "aten", "name": name, "bytes": 0, "launches": 0, "host_sync": True}
    if name == "sort":
        n = ins[0].numel()
        key = ins[0].element_size()
        passes = math.ceil(key * 8 / MODEL["sort_radix_bits"])
        moved = passes * 2 * n * (key + 8)  # keys + int64 indices read and written per pass
        return {
            "kind": "aten",
            "name": name,
            "bytes": moved,
            "launches": passes + 1,
            "note": f"cub radix sort model: {passes} passes over keys+indices",
        }
    if name in _WRITE_ONLY:
        b = sum(_nbytes(o) for o in outs) or sum(_nbytes(a) for a in ins[:1])
    elif name.endswith("_") and name != "copy_":  # in-place: read inputs, write self
        b = sum(_nbytes(a) for a in ins) + (_nbytes(ins[0]) if ins else 0)
    else:
        seen, b = set(), 0
        for a in ins + outs:
            if id(a) not in seen:
                seen.add(id(a))
                b += _nbytes(a)
    return {"kind": "aten", "name": name, "bytes": b, "launches": 1, "shape": [list(o.shape) for o in outs][:2]}


def _cpp_event(func, args, out):
    """A call of a C++ patch op seen by the dispatch mode -> its events (:func:`_patch_events`)."""
    import torch

    name = func._schema.name.split("::")[-1]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    ids = tensors[1] if len(tensors) > 1 else None
    tok = out if name == "patchify" else tensors[0]
    image = tensors[0] if name == "patchify" else out
    return _patch_events(name, image, tok, ids)


def _patch_events(name, image, tok, ids):
    """The launches of one C++ patch op call on CUDA, modelled from ``csrc/patchify_cuda.cu`` (its
    code cannot be dispatched here): ``patchify`` and ``unpatchify`` without ids are one copy kernel
    (one 16-byte unit per thread at these shapes); ``unpatchify`` with ids (patchify's backward) is
    either an inverse map (fill + ``inverse_ids_kernel`` + ``unpatch_from_inverse_kernel`` writing
    every image unit once), when the source has it, or a zero-fill of the image + the copy kernel."""
    v = 16 // tok.element_size()  # elements per 16-byte unit
    if name == "unpatchify" and ids is not None and "unpatch_from_inverse_kernel" in _cu_source():
        B, T = ids.shape
        n_cells = image.shape[1] * image.shape[2] * image.shape[3] // tok.shape[2]  # (H/p)(W/p)
        inv = B * n_cells * 4
        return [
            {"kind": "aten", "name": "full (inverse map, -1)", "bytes": inv, "launches": 1},
            {"kind": "cpp", "name": "unpatchify: inverse map", "cuda_kernel": "inverse_ids_kernel",
             "bytes": _nbytes(ids) + B * T * 4, "launches": 1, "threads": B * T},
            {"kind": "cpp", "name": "unpatchify: image from the inverse map",
             "cuda_kernel": "unpatch_from_inverse_kernel<uint4, int32>",
             "bytes": _nbytes(image) + _nbytes(tok) + inv, "launches": 1, "threads": image.numel() // v},
        ]  # fmt: skip
    ev = [
        {
            "kind": "cpp",
            "name": f"{name} (patch_copy_kernel)",
            "cuda_kernel": f"patch_copy_kernel<uint4, int32, {'true' if name == 'patchify' else 'false'}>",
            "bytes": 2 * _nbytes(tok) + (0 if ids is None else _nbytes(ids)),
            "launches": 1,
            "threads": tok.numel() // v,
        }
    ]
    if name == "unpatchify" and ids is not None:
        ev.insert(0, {"kind": "aten", "name": "zeros (unpatchify image)", "bytes": _nbytes(image), "launches": 1})
    return ev


def _cu_source() -> str:
    try:
        with open(os.path.join(ROOT, "csrc", "patchify_cuda.cu")) as f:
            return f.read()
    except OSError:
        return ""


def _cu_threads_per_block() -> int:
    import re

    m = re.search(r"constexpr int kThreads = (\d+)", _cu_source())
    return int(m.group(1)) if m else 256


class Capture:
    """Dispatch mode + Triton launch capture around one op call (see the module docstring)."""

    def __init__(self, standin, keys_only=False):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.standin = standin
        self.events: list[dict] = []
        cap = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                from torch._library.custom_ops import _maybe_get_opdef

                kwargs = kwargs or {}
                if func.namespace == "rectok_fast":
                    opdef = _maybe_get_opdef(func._schema.name)
                    if opdef is not None:
                        with self:
                            return opdef._init_fn(*args, **kwargs)
                    out = func(*args, **kwargs)
                    cap.events.extend(_cpp_event(func, args, out))
                    return out
                out = func(*args, **kwargs)
                ev = _aten_event(func, args, kwargs, out)
                if ev is not None:
                    cap.events.append(ev)
                return out

        self.mode = Mode()
        self.keys_only = keys_only

    current = None  # the active capture (the C++ op model appends to it)

    def __enter__(self):
        Capture.current = self
        self.standin.listeners.append(self._on_launch)
        self.standin.keys_only = self.keys_only
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.standin.listeners.remove(self._on_launch)
        self.standin.keys_only = False

    def _on_launch(self, launch):
        self.events.append({"kind": "triton", "launch": launch})


def run_op(spec: OpSpecs, name, dt, mode, standin, K=None, keys_only=False):
    import torch

    grad = mode == "fwd+bwd"
    built = spec.build(name, dt, grad, K)
    cap = Capture(standin, keys_only=keys_only)
    with cap:
        outs = built.run()
        if grad:
            pairs = built.grad_outputs(outs)
            if pairs and built.grad_inputs:
                torch.autograd.grad([o for o, _ in pairs], built.grad_inputs, [g for _, g in pairs], allow_unused=True)
    return built, cap.events


# ----------------------------------------------------------------------------- kernel analysis


def occupancy(regs: int, smem: int, warps: int) -> dict:
    M = MODEL
    regs_warp = math.ceil(max(regs, 1) * 32 / M["reg_alloc_unit"]) * M["reg_alloc_unit"]
    by_regs = (M["regs_per_sm"] // regs_warp) // warps
    by_warps = M["max_warps_per_sm"] // warps
    by_smem = M["smem_per_sm"] // (smem + M["smem_reserved_per_block"]) if smem else M["max_blocks_per_sm"]
    blocks = max(0, min(by_regs, by_warps, by_smem, M["max_blocks_per_sm"]))
    limiter = min(
        (by_regs, "registers"), (by_warps, "warps"), (by_smem, "shared memory"), (M["max_blocks_per_sm"], "blocks")
    )[1]
    return {"blocks_per_sm": blocks, "resident_warps_per_sm": blocks * warps, "limited_by": limiter}


class KernelCache:
    def __init__(self):
        self.sass = {}

    def sass_of(self, compiled):
        from . import _sass

        key = id(compiled)
        if key not in self.sass:
            path = _sass.write_temp(compiled.asm["cubin"], ".cubin")
            try:
                self.sass[key] = (_sass.disassemble(path), _sass.resource_usage(path))
            finally:
                os.unlink(path)
        return self.sass[key]


def _arg_values(launch) -> dict:
    vals = {}
    for k, v in launch["args"].items():
        if isinstance(v, bool):
            vals[k] = int(v)
        elif isinstance(v, (int, float)):
            vals[k] = v
        elif hasattr(v, "value") and isinstance(v.value, (int, float, bool)):
            vals[k] = v.value
    return vals


def _hints_for(launch, hints):
    if not hints:
        return {}
    out = {}
    for key, v in hints.items():
        if isinstance(v, dict):  # segment-sum style: shared table (R == N) or per-sample rows
            R = launch["args"].get("R")
            out[key] = v["shared"] if R == SHAPES["N"] else v["per_sample"]
        else:
            out[key] = v
    return out


def analyze_launch(launch, kc: KernelCache, elements: int, hints: dict | None) -> dict:
    import torch

    from . import _sass, _ttir

    k = launch["compiled"]
    sass, res = kc.sass_of(k)
    vals = _arg_values(launch)
    vals["__grid__"] = tuple(launch["grid"])
    h = _hints_for(launch, hints)
    sa = _sass.analyze_sass(sass, launch["name"], vals, h)
    ptx = _sass.parse_ptxas_log(launch.get("ptxas_log") or "")
    warps = launch["num_warps"]
    programs = launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
    threads = programs * warps * 32
    smem = int(getattr(k.metadata, "shared", 0) or 0)
    regs = ptx["regs"] if ptx["regs"] is not None else res.get("REG")
    occ = occupancy(regs or 0, smem, warps)
    # bytes per pointer argument: min(requested by the TTIR accesses, the tensor's size)
    acc = _ttir.accesses(k.asm["ttir"], launch["runtime_arg_names"], vals, programs, h)
    bytes_k = load_k = 0.0
    per_arg = {}
    for argname, d in acc.items():
        t = launch["args"].get(argname)
        cap = _nbytes(t) if isinstance(t, torch.Tensor) else float("inf")
        ld, st = min(d["load"], cap), min(d["store"], cap)
        per_arg[argname] = {"load": ld, "store": st}
        bytes_k += ld + st
        load_k += ld
    instr_thread = sa["executed_per_thread"]
    return {
        "name": launch["name"],
        "signature": launch["signature"],
        "constexprs": launch["constexprs"],
        "grid": list(launch["grid"]),
        "num_warps": warps,
        "programs": programs,
        "regs": regs,
        "spills": ptx["spills"] if ptx["spills"] is not None else None,
        "spill_stores": ptx["spill_stores"],
        "spill_loads": ptx["spill_loads"],
        "stack": ptx["stack"] if ptx["stack"] is not None else res.get("STACK"),
        "local_bytes": res.get("LOCAL"),
        "shared_mem": smem,
        **occ,
        "global_load_widths": sa["global_load_widths"],
        "global_store_widths": sa["global_store_widths"],
        "mem_instructions": sa["mem_instructions"],
        "executed_instr_per_thread": instr_thread,
        "barriers_per_thread": sa["barriers_per_thread"],
        "sass_static_hot": sa["static_hot"],
        "sass_static_cold": sa["static_cold"],
        "sass_per_element": instr_thread * threads / elements,
        "thread_instructions": instr_thread * threads,
        "loops": sa["loops"],
        "unknown_loops": sa["unknown_loops"],
        "bytes": bytes_k,
        "load_bytes": load_k,
        "bytes_by_arg": per_arg,
        "inflight_load_bytes_per_warp": 32 * sa["inflight_load_bytes_per_thread"],
        "ptxas_log_seen": bool(launch.get("ptxas_log")),
    }


def _kernel_time(ka: dict, mach: dict) -> dict:
    t_mem = ka["bytes"] / mach["bw_copy"]
    t_issue = ka["thread_instructions"] / issue_rate(mach)
    active_blocks = min(ka["programs"], mach["sms"] * max(ka["blocks_per_sm"], 1))
    warps_in_flight = active_blocks * ka["num_warps"]
    bw_reach = warps_in_flight * ka["inflight_load_bytes_per_warp"] / MODEL["memory_latency_s"]
    t_reach = ka["load_bytes"] / bw_reach if bw_reach > 0 else 0.0
    t_matrix = ka["flops"] / matrix_rate(mach, ka["dtype"])[0] if ka.get("flops") else 0.0
    t = max(t_mem, t_issue, t_reach, t_matrix)
    bound = {
        t_matrix: "matrix rate",
        t_mem: "memory",
        t_issue: "instruction issue",
        t_reach: "latency (too few loads in flight)",
    }[t]
    out = {"t": t, "t_mem": t_mem, "t_issue": t_issue, "t_reach": t_reach, "bw_reachable": bw_reach, "bound": bound}
    if ka.get("flops"):
        out["t_matrix"] = t_matrix
    return out


# ----------------------------------------------------------------------------- CUDA (csrc/*.cu)


def compile_cuda_async(tmpdir):
    """Start ``nvcc -cubin -arch=sm_90 -Xptxas -v`` on every csrc/*.cu (build flags of setup.py)."""
    import glob

    from torch.utils import cpp_extension

    procs = []
    incs = []
    for p in cpp_extension.include_paths():
        incs += ["-I", p]
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))):
        out = os.path.join(tmpdir, os.path.basename(cu) + ".cubin")
        cmd = [
            "nvcc",
            "-cubin",
            "-arch=sm_90",
            "-O3",
            "--use_fast_math",
            "-lineinfo",
            "-Xptxas",
            "-v",
            "-std=c++20",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            *incs,
            "-o",
            out,
            cu,
        ]
        try:
            procs.append((cu, out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        except FileNotFoundError:
            procs.append((cu, out, None))
    return procs


def _demangle(name: str) -> str:
    """``_ZN...17patch_copy_kernelI5uint4iLb1EEEv...`` -> ``patch_copy_kernel<uint4, int32, true>``."""
    import re

    units = {"5uint4": "uint4", "5uint2": "uint2", "j": "uint32", "t": "uint16"}
    m = re.search(r"([a-z_]+_kernel)I(5uint4|5uint2|j|t)([il])(?:Lb([01])E)?E", name)
    if m:
        args = [units[m.group(2)], {"i": "int32", "l": "int64"}[m.group(3)]]
        if m.group(4) is not None:
            args.append("true" if m.group(4) == "1" else "false")
        return f"{m.group(1)}<{', '.join(args)}>"
    m = re.search(r"\d+([a-z_]+_kernel)E?P", name)
    return m.group(1) if m else name


def finish_cuda(procs) -> dict:
    from . import _sass

    out = {}
    for cu, cubin, proc in procs:
        if proc is None:
            out[os.path.basename(cu)] = {"error": "nvcc not found"}
            continue
        _, err = proc.communicate()
        if proc.returncode != 0:
            out[os.path.basename(cu)] = {"error": err[-2000:]}
            continue
        kernels = {}
        logs = err.split("ptxas info    : Compiling entry function '")
        for chunk in logs[1:]:
            fname = chunk.split("'", 1)[0]
            kernels[fname] = {"ptxas": _sass.parse_ptxas_log(chunk)}
        for fname, sass in _sass.disassemble_all(cubin).items():
            est = _sass.one_pass_estimate(sass)
            kernels.setdefault(fname, {})["sass"] = {
                "executed_instr_per_thread": est["executed_per_thread"],
                "global_load_widths": est["global_load_widths"],
                "global_store_widths": est["global_store_widths"],
                "estimate": est.get("estimate"),
            }
        out[os.path.basename(cu)] = {_demangle(k): v for k, v in kernels.items()}
    return out


def _cuda_kernel_for(cuda: dict, ev: dict) -> tuple[str, dict] | None:
    """The instantiation a bench-shape call uses (16-byte units: p·E and W·E multiples of 16, aligned
    allocations; int32 indices), named by the event."""
    for kernels in cuda.values():
        if ev.get("cuda_kernel") in kernels:
            return ev["cuda_kernel"], kernels[ev["cuda_kernel"]]
    return None


# ----------------------------------------------------------------------------- report


def op_report(name, dtn, dt, mode, spec, standin, kc, cuda) -> tuple[dict, list]:
    """One op, dtype and mode: its launches, bytes and predicted time (``cuda()`` gives the nvcc results)."""
    built, events = run_op(spec, name, dt, mode, standin)
    kernels, steps = [], []
    for ev in events:
        if ev["kind"] == "triton":
            ka = analyze_launch(ev["launch"], kc, built.elements, built.hints)
            ka["dtype"] = dtn
            ka["op"] = name
            if built.flops and ka["name"] in built.flops:
                ka["flops"], ka["flops_min"] = built.flops[ka["name"]]
            if built.active_programs and ka["name"] in built.active_programs:
                frac = built.active_programs[ka["name"]]  # program 0's path counted for that share only
                ka["active_program_fraction"] = frac
                ka["thread_instructions"] *= frac
                ka["sass_per_element"] *= frac
            kernels.append(ka)
            steps.append({"kind": "triton", "name": ka["name"], "bytes": ka["bytes"], "launches": 1, "kernel": ka})
        elif ev["kind"] == "cpp":
            step = dict(ev)
            found = _cuda_kernel_for(cuda(), ev)
            if found:
                kname, info = found
                threads = ev["threads"]
                instr = info.get("sass", {}).get("executed_instr_per_thread", 0.0)
                ptx = info.get("ptxas", {})
                tpb = _cu_threads_per_block()
                blocks = math.ceil(threads / tpb)
                occ = occupancy(ptx.get("regs") or 0, 0, tpb // 32)
                ka = {
                    "name": kname,
                    "dtype": dtn,
                    "op": name,
                    "signature": "C++ (csrc/patchify_cuda.cu)",
                    "grid": [blocks, 1, 1],
                    "num_warps": tpb // 32,
                    "programs": blocks,
                    "regs": ptx.get("regs"),
                    "spills": ptx.get("spills"),
                    "stack": ptx.get("stack"),
                    "shared_mem": 0,
                    **occ,
                    "global_load_widths": info.get("sass", {}).get("global_load_widths"),
                    "global_store_widths": info.get("sass", {}).get("global_store_widths"),
                    "executed_instr_per_thread": instr,
                    "thread_instructions": instr * threads,
                    "sass_per_element": instr * threads / built.elements,
                    "bytes": ev["bytes"],
                    "load_bytes": ev["bytes"] / 2,
                    "inflight_load_bytes_per_warp": 32 * 16,
                    "estimate": info.get("sass", {}).get("estimate"),
                }
                kernels.append(ka)
                step["kernel"] = ka
            steps.append(step)
        else:
            steps.append(ev)
    if not any(s["kind"] in ("triton", "cpp") for s in steps):
        raise RuntimeError(f"{name}: no fused kernel was launched (did the functional take the reference path?)")
    rep = {
        "bytes_min": built.bytes_fwd + (built.bytes_bwd if mode == "fwd+bwd" else 0),
        "bytes_actual": sum(s["bytes"] for s in steps),
        "launches": sum(s["launches"] for s in steps),
        "host_syncs": sum(1 for s in steps if s.get("host_sync")),
        "steps": [
            {k: v for k, v in s.items() if k != "kernel"} | ({"kernel": s["kernel"]["name"]} if "kernel" in s else {})
            for s in steps
        ],
        "predicted_time_s": {},
        "predicted_frac_copy_bw": {},
        "bound_by": {},
    }
    flop_kernels = [s["kernel"] for s in steps if s.get("kernel", {}).get("flops")]
    if flop_kernels:
        rep["flops"] = sum(k["flops"] for k in flop_kernels)
        rep["flops_min"] = sum(k["flops_min"] for k in flop_kernels)
        rep["matrix_rate_flop_s"] = {m: matrix_rate(mach, dtn)[0] for m, mach in MACHINES.items()}
        rep["matrix_unit"] = matrix_rate(MACHINES["H200"], dtn)[1]
        rep["predicted_frac_matrix_rate"] = {}
    for mname, mach in MACHINES.items():
        t = 0.0
        worst = (0.0, "")
        for s in steps:
            if "kernel" in s:
                kt = _kernel_time(s["kernel"], mach)
                s["kernel"].setdefault("predicted", {})[mname] = kt
                t += kt["t"]
                if kt["t"] > worst[0]:
                    worst = (kt["t"], f"{s['kernel']['name']}: {kt['bound']}")
            else:
                t += s["bytes"] / mach["bw_copy"]
        t_launch = rep["launches"] * MODEL["t_launch_s"]
        t += t_launch
        rep["predicted_time_s"][mname] = t
        rep["predicted_frac_copy_bw"][mname] = rep["bytes_min"] / (t * mach["bw_copy"]) if t > 0 else None
        if flop_kernels:  # compute-bound: useful FLOPs (no tile padding) over t at the matrix rate
            rate = rep["matrix_rate_flop_s"][mname]
            rep["predicted_frac_matrix_rate"][mname] = rep["flops_min"] / (t * rate) if t > 0 else None
        rep["bound_by"][mname] = worst[1]
        if t > 0 and t_launch / t > 0.2:
            rep["bound_by"][mname] += f"; launches {100 * t_launch / t:.0f}% of t"
    return rep, kernels


def variants_across_K(spec, name, dt, standin) -> dict:
    """Distinct Triton specialisations per kernel over K = ceil(N (1 - r)), r in the recipe's range."""
    N = SHAPES["N"]
    lo = math.ceil(N * (1 - MASK_RATIO_RANGE[1]))
    hi = math.ceil(N * (1 - MASK_RATIO_RANGE[0]))
    keys: dict[str, set] = {}
    for K in range(lo, hi + 1):
        for mode in ("fwd+bwd",):
            _, events = run_op(spec, name, dt, mode, standin, K=K, keys_only=True)
            for ev in events:
                if ev["kind"] == "triton":
                    keys.setdefault(ev["launch"]["name"], set()).add(ev["launch"]["key"])
    return {k: len(v) for k, v in keys.items()} | {"_K_range": [lo, hi]}


def _commit() -> str | None:
    try:
        from .common import commit

        return commit()
    except Exception:
        return None


def build_report(op_names, dtypes, modes, do_variants=True, log=print) -> dict:
    import torch
    import triton

    from . import _standin

    standin = _standin.activate()
    tmp = tempfile.mkdtemp(prefix="kernel_report_cuda_")
    atexit.register(shutil.rmtree, tmp, True)
    cuda_procs = compile_cuda_async(tmp) if any(n in ("patchify", "unpatchify") for n in op_names) else []
    spec = OpSpecs(_make_fake())
    kc = KernelCache()
    DT = {"bf16": torch.bfloat16, "fp32": torch.float32}
    report = {
        "label": "predicted from compiled code (no GPU ran)",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "commit": _commit(),
        "target": "cuda sm_90 (GPUTarget('cuda', 90, 32))",
        "shapes": SHAPES,
        "machines": MACHINES,
        "model": MODEL
        | {
            "issue_rate_thread_instr_per_s": {k: issue_rate(m) for k, m in MACHINES.items()},
            "formula": "t = sum_k max(bytes_k/BW_copy, thread_instr_k/issue_rate, load_bytes_k/BW_reachable_k, "
            "flops_k/matrix_rate) + launches*t_launch; aten ops: bytes/BW_copy; predicted_frac_copy_bw = "
            "bytes_min/(t*BW_copy); compute-bound ops (distmat_align_loss): predicted_frac_matrix_rate = "
            "flops_min/(t*matrix_rate)",
            "matrix_rate": {
                "bf16": "tensor cores, matrix_bf16 of the machine (790e12: a measured dense-GEMM figure for the "
                "H200, 989e12 datasheet; quoted, not measured here)",
                "fp32": f"{matrix_rate(MACHINES['H200'], 'fp32')[1]}: {matrix_rate(MACHINES['H200'], 'fp32')[0] / 1e12:.1f} "
                f"TFLOP/s ({MACHINES['H200']['sms']} SMs x {FP32_FMA_LANES_PER_SM} lanes x 2 x "
                f"{MACHINES['H200']['clock_hz'] / 1e9:.2f} GHz; 67 datasheet)",
                "flops": "rectok_fast.ops.distmat.distmat_align_flops: executed (tile-padded, what the kernels do) "
                "sets t_matrix; minimum (no padding, symmetric forward) is the useful work in the share",
            },
            "notes": [
                "instructions: SASS on the hot path, loop bodies times their trip counts (Python for loops matched "
                "through line info, bounds evaluated from the launch arguments); both sides of an if count; cold "
                "library slow paths (libdevice trig argument reduction) are compiled in but not counted",
                "bytes per Triton kernel: TTIR loads/stores per pointer argument, capped at the tensor's size "
                "(L2 absorbs re-reads of small shared tables)",
                "aten ops issued by launchers and autograd count their inputs + outputs at BW_copy; "
                "torch.sort as a cub radix sort (one pass per 8 key bits)",
                "C++ patch ops: instructions of one grid-stride pass (entry to the first EXIT after the first store)",
                "loop trips: evaluated for program 0 from the launch arguments and the kernel's earlier assignments; "
                "data-dependent bounds from the op's hints for the benchmark data (gather: sources per destination "
                "row of random ids; token ops: distinct ids, so while-walks over duplicates do not iterate); a loop "
                "without either counts one pass and is listed in unknown_loops",
                "several SASS copies of one Python loop (unrolled main loop + remainder) share its trips in "
                "proportion to their body sizes",
                "BW_reachable: resident warps (capped by the grid) x global-load bytes one pass of the hot "
                "loop body keeps in flight / memory latency",
            ],
        },
        "ops": {},
        "kernels": [],
        "cuda": {},
        "errors": {},
    }
    all_kernels = []
    cuda: dict = {}

    def get_cuda():  # nvcc runs in the background while the Triton kernels compile; wait on first use
        if cuda_procs and not cuda:
            cuda.update(finish_cuda(cuda_procs))
            report["cuda"] = cuda
            for cu, info in cuda.items():
                if "error" in info:
                    report["errors"][f"nvcc.{cu}"] = info["error"]
        return cuda

    for name in op_names:
        for dtn in dtypes:
            for mode in modes:
                if mode == "fwd+bwd" and not spec.has_bwd(name):
                    continue
                t0 = time.time()
                try:
                    rep, kernels = op_report(name, dtn, DT[dtn], mode, spec, standin, kc, get_cuda)
                except Exception as e:  # reported, and --check fails on it
                    report["errors"][f"{name}.{dtn}.{mode}"] = f"{type(e).__name__}: {e}"
                    log(f"  {name} {dtn} {mode}: ERROR {type(e).__name__}: {e}")
                    continue
                report["ops"].setdefault(name, {}).setdefault(dtn, {})[mode] = rep
                all_kernels += kernels
                log(
                    f"  {name:24s} {dtn} {mode:8s} bytes_min {rep['bytes_min'] / 1e6:8.1f} MB  actual "
                    f"{rep['bytes_actual'] / 1e6:8.1f} MB  launches {rep['launches']:2d}  H200 "
                    f"{rep['predicted_frac_copy_bw']['H200']:.2f}  ({time.time() - t0:.1f} s)"
                )
    # unique kernels (name, dtype, signature, grid)
    seen = {}
    for ka in all_kernels:
        key = (ka["op"], ka["name"], ka["dtype"], ka["signature"], tuple(ka["grid"]))
        if key not in seen:
            seen[key] = {k: v for k, v in ka.items() if k not in ("mem_instructions",)}
    variants = {}
    if do_variants:
        for name in op_names:
            if not spec.depends_on_K(name) or name in ("patchify",):
                continue
            for dtn in dtypes:
                try:
                    variants[(name, dtn)] = variants_across_K(spec, name, DT[dtn], standin)
                except Exception as e:
                    report["errors"][f"variants.{name}.{dtn}"] = f"{type(e).__name__}: {e}"
    for ka in seen.values():
        v = variants.get((ka["op"], ka["dtype"]))
        if ka["signature"].startswith("C++"):
            ka["variants_across_K"] = 1
            ka["variants_basis"] = "C++: one compiled instantiation per unit width, no specialisation"
        elif not spec.depends_on_K(ka["op"]):
            ka["variants_across_K"] = 1
            ka["variants_basis"] = "the op's shapes do not depend on the mask ratio"
        elif v is not None:
            ka["variants_across_K"] = v.get(ka["name"])
            ka["K_range"] = v.get("_K_range")
            ka["variants_basis"] = "distinct Triton specialisation keys over every K in K_range (fwd+bwd)"
        else:
            ka["variants_across_K"] = None
            ka["variants_basis"] = "not computed (--no-variants or an error)"
        report["kernels"].append(ka)
    return report


# ----------------------------------------------------------------------------- markdown / README


def _pct(v):
    return "—" if v is None else f"{100 * v:.0f}%"


def _matrix_share(r: dict, machine: str) -> str:
    return _pct((r.get("predicted_frac_matrix_rate") or {}).get(machine)) if "flops_min" in r else "—"


def _gflop(r: dict) -> str:
    return f"{r['flops_min'] / 1e9:.0f}" if "flops_min" in r else "—"


def _matrix_note(report: dict) -> str:
    """The note that compute-bound ops are judged against the matrix rate (rates from the report)."""
    mr = (report.get("model") or {}).get("matrix_rate") or {}
    h200 = (report.get("machines") or MACHINES).get("H200", {})
    bf16 = h200.get("matrix_bf16", MACHINES["H200"]["matrix_bf16"])
    return (
        "`distmat_align_loss` is compute-bound: judge it by its share of the matrix rate (useful matmul FLOPs / "
        f"(t · rate)), not by its share of copy bandwidth. Rates: bf16 {bf16 / 1e12:.0f} TFLOP/s dense "
        "(a measured dense-GEMM figure for the H200, quoted, not measured here; 989 datasheet; H100 assumed equal); "
        f"fp32: {mr.get('fp32', 'see kernel_report.json')}."
    )


def _kt(ka: dict, key: str, scale: float | None = None) -> str:
    v = (ka.get("predicted") or {}).get("H200", {}).get(key)
    if v is None:
        return "—"
    return f"{v * scale:.1f}" if scale else str(v)


def _measured(summary: dict | None) -> dict:
    """op -> measured ``frac_copy_bw`` (bf16, fwd+bwd, B = 256) from a GPU run's summary.json."""
    return {
        op: e["frac_copy_bw"]
        for op, e in ((summary or {}).get("ops") or {}).items()
        if e.get("frac_copy_bw") is not None
    }


def markdown(report: dict, summary: dict | None = None) -> str:
    measured = _measured(summary)
    lines = [
        f"**Predicted from compiled code** (no GPU ran): every Triton kernel compiled for sm_90 through the real "
        f"launchers at B = {SHAPES['B']}, N = {SHAPES['N']}, C = {SHAPES['C']}, token width {SHAPES['W']}, "
        f"teacher width {SHAPES['D']}, K = {SHAPES['K']}; triton {report['triton']}, torch {report['torch']}, "
        f"commit `{(report.get('commit') or 'unknown')[:12]}`. "
        "Generated by `python -m benchmarks.kernel_report` into `benchmarks/results/static/kernel_report.json`; "
        "do not edit by hand.",
        "",
        "Model: `t = Σ max(bytes/BW_copy, SASS instructions/issue rate, load bytes/BW_reachable, matmul FLOPs/matrix rate) "
        "+ launches·t_launch` (the matrix term only for ops that state their FLOPs); "
        f"H200 BW_copy {MACHINES['H200']['bw_copy'] / 1e12:.1f} TB/s, H100 {MACHINES['H100']['bw_copy'] / 1e12:.1f} TB/s, "
        f"{issue_rate(MACHINES['H200']):.3g} thread-instructions/s, memory latency {MODEL['memory_latency_s'] * 1e9:.0f} ns, "
        f"t_launch {MODEL['t_launch_s'] * 1e6:.1f} µs. Share = bytes_min / (t · BW_copy).",
        "",
        _matrix_note(report),
        "",
    ]
    head = (
        "| op | dtype | mode | bytes_min MB | bytes_actual MB | launches | t H200 µs | predicted H200 | predicted H100 "
        "| limited by (H200) | GFLOP (min) | share of matrix rate H200 / H100 |"
    )
    sep = "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"
    if measured:
        head += " measured (GPU) |"
        sep += "---:|"
    lines += [head, sep]
    for op, by_dt in report["ops"].items():
        for dtn, by_mode in by_dt.items():
            for mode, r in by_mode.items():
                row = (
                    f"| `{op}` | {dtn} | {mode} | {r['bytes_min'] / 1e6:.1f} | {r['bytes_actual'] / 1e6:.1f} | "
                    f"{r['launches']} | {r['predicted_time_s']['H200'] * 1e6:.1f} | {_pct(r['predicted_frac_copy_bw']['H200'])} | "
                    f"{_pct(r['predicted_frac_copy_bw']['H100'])} | {r['bound_by']['H200']} | "
                    f"{_gflop(r)} | {_matrix_share(r, 'H200')} / {_matrix_share(r, 'H100')} |"
                )
                if measured:
                    m = measured.get(op) if (dtn == "bf16" and mode == "fwd+bwd") else None
                    row += f" {_pct(m)} |"
                lines.append(row)
    lines += [
        "",
        "| kernel | op | dtype | grid | warps | regs | spills | stack B | resident warps/SM | loads | stores "
        "| SASS/element | t H200 µs | limited by | variants across K |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---|---:|",
    ]
    for ka in report["kernels"]:
        lines.append(
            f"| `{ka['name']}` | {ka['op']} | {ka['dtype']} | {'×'.join(str(g) for g in ka['grid'])} | {ka['num_warps']} | "
            f"{ka['regs']} | {ka['spills']} | {ka['stack']} | {ka['resident_warps_per_sm']} | "
            f"{', '.join(ka.get('global_load_widths') or [])} | {', '.join(ka.get('global_store_widths') or [])} | "
            f"{ka['sass_per_element']:.1f} | {_kt(ka, 't', 1e6)} | {_kt(ka, 'bound')} | {ka.get('variants_across_K')} |"
        )
    if report.get("errors"):
        lines += ["", "Errors:", ""] + [f"- `{k}`: {v}" for k, v in report["errors"].items()]
    if measured:
        lines += [
            "",
            f"Measured: `frac_copy_bw` of `benchmarks/results/summary.json` ({summary.get('device')}, bf16, fwd+bwd).",
        ]
    return "\n".join(lines)


def readme_table(report: dict, summary: dict | None = None) -> str:
    """The README's compact table: bf16, fwd+bwd (fwd for ops without a backward), one row per op."""
    measured = _measured(summary)
    spills = sorted({k["name"] for k in report["kernels"] if k.get("spills")})
    lines = [
        f"Predicted from compiled code (no GPU ran; triton {report['triton']}, sm_90, B = {SHAPES['B']}, "
        f"N = {SHAPES['N']}, C = {SHAPES['C']}, K = {SHAPES['K']}): share of the device copy bandwidth "
        f"(H200 {MACHINES['H200']['bw_copy'] / 1e12:.1f} TB/s, H100 {MACHINES['H100']['bw_copy'] / 1e12:.1f} TB/s) "
        "the op would reach, from its minimal bytes and a model of its compiled kernels. Generated by "
        "`python -m benchmarks.kernel_report --readme`; every kernel, dtype and mode, with registers, spills and "
        "SASS per element: [`benchmarks/results/static/kernel_report.md`](benchmarks/results/static/kernel_report.md).",
        "",
    ]
    head = (
        "| op (bf16) | mode | bytes actual / min | launches | predicted H200 | predicted H100 | limited by "
        "| share of matrix rate H200 |"
    )
    sep = "|---|---|---:|---:|---:|---:|---|---:|"
    if measured:
        head += " measured |"
        sep += "---:|"
    lines += [head, sep]
    for op, by_dt in report["ops"].items():
        by_mode = by_dt.get("bf16") or {}
        mode = "fwd+bwd" if "fwd+bwd" in by_mode else "fwd"
        r = by_mode.get(mode)
        if r is None:
            continue
        row = (
            f"| `{op}` | {mode} | {r['bytes_actual'] / r['bytes_min']:.2f}× | {r['launches']} | "
            f"{_pct(r['predicted_frac_copy_bw']['H200'])} | {_pct(r['predicted_frac_copy_bw']['H100'])} | "
            f"{r['bound_by']['H200'] or 'memory (aten ops)'} | {_matrix_share(r, 'H200')} |"
        )
        if measured:
            row += f" {_pct(measured.get(op)) if mode == 'fwd+bwd' else '—'} |"
        lines.append(row)
    lines += ["", _matrix_note(report)]
    lines += ["", f"Kernels that spill: {', '.join(f'`{n}`' for n in spills) if spills else 'none'}."]
    if measured:
        lines.append(f"Measured: `frac_copy_bw` in `benchmarks/results/summary.json` ({summary.get('device')}).")
    return "\n".join(lines)


def insert_readme(path: str, text: str) -> bool:
    with open(path) as f:
        s = f.read()
    i, j = s.find(START), s.find(END)
    if i < 0 or j < i:
        return False
    with open(path, "w") as f:
        f.write(s[: i + len(START)] + "\n" + text + "\n" + s[j:])
    return True


def _load_summary():
    try:
        with open(SUMMARY) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT_DIR, help="directory for kernel_report.json / .md")
    ap.add_argument("--ops", nargs="*", help="subset of ops (default: all)")
    ap.add_argument("--dtypes", nargs="*", default=["bf16", "fp32"])
    ap.add_argument("--modes", nargs="*", default=["fwd", "fwd+bwd"])
    ap.add_argument("--no-variants", action="store_true", help="skip the variants-across-K pass")
    ap.add_argument("--check", action="store_true", help="exit 1 if any kernel spills (errors always exit 1)")
    ap.add_argument("--readme", nargs="?", const=os.path.join(ROOT, "README.md"), help="insert the table into README")
    ap.add_argument(
        "--from-json",
        action="store_true",
        help="compile nothing: regenerate the markdown (and README table) from --out's kernel_report.json "
        "and benchmarks/results/summary.json (after a GPU run updated the measurements)",
    )
    args = ap.parse_args(argv)
    if args.from_json:
        with open(os.path.join(args.out, "kernel_report.json")) as f:
            report = json.load(f)
        summary = _load_summary()
        with open(os.path.join(args.out, "kernel_report.md"), "w") as f:
            f.write(markdown(report, summary) + "\n")
        table = readme_table(report, summary)
        print(table)
        if args.readme and not insert_readme(args.readme, table):
            print(f"{args.readme}: no {START} / {END} markers; table not inserted", file=sys.stderr)
        return 0
    t0 = time.time()
    from . import _standin

    _standin.prepare_environment()
    spec_names = OpSpecs(None).names()
    names = args.ops or spec_names
    unknown = [n for n in names if n not in spec_names]
    if unknown:
        ap.error(f"unknown ops {unknown}; choose from {spec_names}")
    report = build_report(
        names, args.dtypes, args.modes, do_variants=not args.no_variants, log=lambda s: print(s, file=sys.stderr)
    )
    report["elapsed_s"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "kernel_report.json")
    with open(jpath, "w") as f:
        json.dump(report, f, indent=1, default=str)
        f.write("\n")
    md = markdown(report, _load_summary())
    with open(os.path.join(args.out, "kernel_report.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    if args.readme and not insert_readme(args.readme, readme_table(report, _load_summary())):
        print(f"{args.readme}: no {START} / {END} markers; table not inserted", file=sys.stderr)
    print(f"wrote {jpath} in {report['elapsed_s']} s", file=sys.stderr)
    failed = bool(report["errors"]) or not report["kernels"]
    spilling = [k["name"] for k in report["kernels"] if k.get("spills")]
    unknown_regs = [k["name"] for k in report["kernels"] if k.get("regs") is None]
    if spilling:
        print(f"kernels that spill: {sorted(set(spilling))}", file=sys.stderr)
    if unknown_regs:
        print(f"kernels without a ptxas log (registers unknown): {sorted(set(unknown_regs))}", file=sys.stderr)
    if failed or (args.check and (spilling or unknown_regs)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
