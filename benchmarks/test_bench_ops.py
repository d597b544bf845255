"""Per-op benchmarks: the fused op, the eager reference and ``torch.compile(reference)`` side by side.

One case per (op, forward or forward+backward, dtype, batch).  On a GPU a case times all three
implementations in the same run (CUDA events, median), so the ratios hold on a noisy machine, and
records in ``benchmark.extra_info``: ``fused_ms``, ``eager_ms``, ``compiled_ms``, the minimal bytes
the op must move (``bytes``; forward plus backward for ``fwd+bwd``), GB/s of each, the fused op's
fraction of the device-to-device copy bandwidth measured in the same session (``frac_copy_bw``)
and the peak extra memory of one call of each.

Shapes are RecTok's (16×16 grid, N = 256, C = 128, ViT-B width 768 for the token ops, teacher
width 1024, 256-px images, 192 of 256 tokens kept).  ``RECTOK_BENCH_SCOPE`` picks the GPU grid:
``summary`` (the six ops of the summary, bf16, B = 256), ``default`` (every op, bf16 and fp32,
B = 256) or ``full`` (also B = 64).  On a CPU-only machine the references and the C++ CPU ops are
timed at small sizes and the Triton cases skip with a reason.

Minimal bytes are counted for a two-kernel implementation (one forward pass, one backward pass):
each tensor an op must read or write once per pass, shared tables (pos, mask token) once, noise
never (generated in-kernel from a seed).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import pytest
import torch
from common import (
    COMPILE_BACKEND,
    DRY,
    HAS_CUDA,
    TRITON_SKIP,
    gbps,
    import_ops,
    peak_mb,
    time_ms,
)

import rectok_fast
import rectok_fast.reference as ref

DEVICE = "cuda" if HAS_CUDA else "cpu"
SEED = 1234
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Sizes:
    N: int  # tokens (16×16 grid)
    C: int  # latent channels
    W: int  # transformer width of the token ops (ViT-B)
    D: int  # teacher feature width
    K: int  # kept tokens after masking
    img: int  # image side
    p: int = 16


PAPER = Sizes(N=256, C=128, W=768, D=1024, K=192, img=256)
SMALL = Sizes(N=64, C=32, W=192, D=256, K=48, img=128)
TOY = Sizes(N=16, C=8, W=32, D=32, K=12, img=64)  # dry runs: Triton under the interpreter
SIZES = PAPER if HAS_CUDA else (TOY if DRY else SMALL)
SCALE = "paper" if SIZES == PAPER else ("dry" if DRY else "cpu-small")


@dataclass
class Case:
    args: tuple  # positional inputs of both the reference and the fused op
    grad_inputs: list  # tensors gradients are taken for in fwd+bwd
    bytes_fwd: int
    bytes_bwd: int
    shape: str
    exact: bool  # fused output must equal the reference (deterministic ops)


def _ids(B: int, N: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    shuffle = torch.argsort(torch.rand(B, N, device=device), dim=1)
    return shuffle[:, :K].contiguous(), torch.argsort(shuffle, dim=1)


def _t(B, device):
    return torch.rand(B, device=device, dtype=torch.float32)


# ---------------------------------------------------------------- op definitions
# build(B, dtype, device, grad, S) -> Case; eager(*args); fused(ops, *args)


def build_posterior_flow(B, dt, dev, grad, S):
    s = torch.finfo(dt).bits // 8
    moments = torch.randn(B, S.N, 2 * S.C, device=dev, dtype=dt, requires_grad=grad)
    bnc = B * S.N * S.C
    fwd = 2 * bnc * s + 2 * bnc * s + 4 * B + 4 * B  # read moments, t; write z, z_t, kl
    bwd = 2 * bnc * s + 2 * bnc * s + 2 * bnc * s + 4 * B + 4 * B  # read dz, dz_t, moments, t, dkl; write dmoments
    return Case((moments, _t(B, dev)), [moments], fwd, bwd, f"moments ({B}, {S.N}, {2 * S.C})", False)


def build_gaussian_kl(B, dt, dev, grad, S):
    s = torch.finfo(dt).bits // 8
    mean = torch.randn(B, S.N, S.C, device=dev, dtype=dt, requires_grad=grad)
    logvar = torch.randn(B, S.N, S.C, device=dev, dtype=dt, requires_grad=grad)
    bnc = B * S.N * S.C
    return Case(
        (mean, logvar),
        [mean, logvar],
        2 * bnc * s + 4 * B,
        4 * bnc * s + 4 * B,
        f"mean/logvar ({B}, {S.N}, {S.C})",
        True,
    )


def build_flow_matching_loss(B, dt, dev, grad, S):
    s = torch.finfo(dt).bits // 8
    pred = torch.randn(B, S.N, S.C, device=dev, dtype=dt, requires_grad=grad)
    x1 = torch.randn(B, S.N, S.C, device=dev, dtype=dt)
    n = B * S.N * S.C
    # fwd: read pred, x1 (x0 regenerated); bwd: read pred, x1, write dpred
    return Case(
        (pred, x1, _t(B, dev)), [pred], 2 * n * s + 4 * B, 3 * n * s + 4 * B, f"pred/x1 ({B}, {S.N}, {S.C})", False
    )


def build_flow_matching_xt(B, dt, dev, grad, S):
    s = torch.finfo(dt).bits // 8
    x1 = torch.randn(B, S.N, S.C, device=dev, dtype=dt)
    n = B * S.N * S.C
    return Case((x1, _t(B, dev)), [], 2 * n * s + 4 * B, 0, f"x1 ({B}, {S.N}, {S.C})", False)


def build_cosine_align_loss(B, dt, dev, grad, S):
    s = torch.finfo(dt).bits // 8
    pred = torch.randn(B, S.N, S.D, device=dev, dtype=dt, requires_grad=grad)
    target = torch.randn(B, S.N, S.D, device=dev, dtype=dt)
    n = B * S.N * S.D
    return Case((pred, target), [pred], 2 * n * s, 3 * n * s, f"pred/target ({B}, {S.N}, {S.D})", True)


def build_kl_align_loss(B, dt, dev, grad, S):
    case = build_cosine_align_loss(B, dt, dev, grad, S)
    case.shape = case.shape.replace("pred/target", "student/teacher")
    return case


def build_gather_tokens(B, dt, dev, grad, S):
    s = torch.finfo(dt).bits // 8
    x = torch.randn(B, S.N, S.W, device=dev, dtype=dt, requires_grad=grad)
    pos = torch.randn(1, S.N, S.W, device=dev, dtype=dt, requires_grad=grad)
    ids_keep, _ = _ids(B, S.N, S.K, dev)
    bkw, nw = B * S.K * S.W, S.N * S.W
    fwd = (2 * bkw + nw) * s + 8 * B * S.K  # read kept rows + pos table, write (B, K, W)
    bwd = (bkw + B * S.N * S.W + nw) * s + 8 * B * S.K  # read dout, write dx (full, zeros included), dpos
    return Case((x, ids_keep, pos), [x, pos], fwd, bwd, f"x ({B}, {S.N}, {S.W}) keep {S.K}", True)


def build_restore_tokens(B, dt, dev, grad, S):
    s = torch.finfo(dt).bits // 8
    visible = torch.randn(B, S.K, S.W, device=dev, dtype=dt, requires_grad=grad)
    mask_token = torch.randn(S.W, device=dev, dtype=dt, requires_grad=grad)
    pos = torch.randn(1, S.N, S.W, device=dev, dtype=dt, requires_grad=grad)
    _, ids_restore = _ids(B, S.N, S.K, dev)
    bkw, bnw, nw = B * S.K * S.W, B * S.N * S.W, S.N * S.W
    fwd = (bkw + nw + S.W + bnw) * s + 8 * B * S.N
    bwd = (bnw + bkw + nw + S.W) * s + 8 * B * S.N
    return Case(
        (visible, ids_restore, mask_token, pos),
        [visible, mask_token, pos],
        fwd,
        bwd,
        f"visible ({B}, {S.K}, {S.W}) -> N {S.N}",
        True,
    )


def build_patchify(B, dt, dev, grad, S):
    s = torch.finfo(dt).bits // 8
    images = torch.randn(B, 3, S.img, S.img, device=dev, dtype=dt, requires_grad=grad)
    ids_keep, _ = _ids(B, S.N, S.K, dev)
    kept = B * S.K * 3 * S.p * S.p
    fwd = 2 * kept * s + 8 * B * S.K  # read kept patches, write tokens
    bwd = (kept + B * 3 * S.img * S.img) * s + 8 * B * S.K  # read dtokens, write the full image grad
    return Case((images, ids_keep), [images], fwd, bwd, f"images ({B}, 3, {S.img}, {S.img}) keep {S.K}", True)


def build_unpatchify(B, dt, dev, grad, S):
    s = torch.finfo(dt).bits // 8
    tokens = torch.randn(B, S.N, 3 * S.p * S.p, device=dev, dtype=dt, requires_grad=grad)
    n = B * S.N * 3 * S.p * S.p
    return Case((tokens,), [tokens], 2 * n * s, 2 * n * s, f"tokens ({B}, {S.N}, {3 * S.p * S.p})", True)


def _grid():
    return int(math.isqrt(SIZES.N))


OPS = {
    # name: (build, eager, fused(ops) -> callable, fused backend, has backward)
    "posterior_flow": (
        build_posterior_flow,
        lambda m, t: ref.posterior_flow(m, t, 1.0),
        lambda ops: lambda m, t: ops.posterior_flow(m, t, 1.0, seed=SEED, backend="triton"),
        "triton",
        True,
    ),
    "flow_matching_loss": (
        build_flow_matching_loss,
        lambda pred, x1, t: ref.flow_matching_loss(pred, x1, t, torch.randn_like(x1)),
        lambda ops: lambda pred, x1, t: ops.flow_matching_loss(pred, x1, t, seed=SEED, backend="triton"),
        "triton",
        True,
    ),
    "flow_matching_xt": (
        build_flow_matching_xt,
        lambda x1, t: ref.flow_matching_xt(x1, t, torch.randn_like(x1)),
        lambda ops: lambda x1, t: ops.flow_matching_xt(x1, t, seed=SEED, backend="triton"),
        "triton",
        False,
    ),
    "cosine_align_loss": (
        build_cosine_align_loss,
        lambda p, t: ref.cosine_align_loss(p, t),
        lambda ops: lambda p, t: ops.cosine_align_loss(p, t, backend="triton"),
        "triton",
        True,
    ),
    "kl_align_loss": (
        build_kl_align_loss,
        lambda s, t: ref.kl_align_loss(s, t),
        lambda ops: lambda s, t: ops.kl_align_loss(s, t, backend="triton"),
        "triton",
        True,
    ),
    "gaussian_kl": (
        build_gaussian_kl,
        lambda m, lv: ref.gaussian_kl(m, lv),
        lambda ops: lambda m, lv: ops.gaussian_kl(m, lv, backend="triton"),
        "triton",
        True,
    ),
    "gather_tokens": (
        build_gather_tokens,
        lambda x, ids, pos: ref.gather_tokens(x, ids, pos),
        lambda ops: lambda x, ids, pos: ops.gather_tokens(x, ids, pos, backend="triton"),
        "triton",
        True,
    ),
    "restore_tokens": (
        build_restore_tokens,
        lambda v, ids, mt, pos: ref.restore_tokens(v, ids, mt, pos),
        lambda ops: lambda v, ids, mt, pos: ops.restore_tokens(v, ids, mt, pos, backend="triton"),
        "triton",
        True,
    ),
    "patchify": (
        build_patchify,
        lambda im, ids: ref.patchify(im, SIZES.p, ids),
        lambda ops: lambda im, ids: ops.patchify(im, SIZES.p, ids, backend="cpp"),
        "cpp",
        True,
    ),
    "unpatchify": (
        build_unpatchify,
        lambda tok: ref.unpatchify(tok, SIZES.p, 3, _grid()),
        lambda ops: lambda tok: ops.unpatchify(tok, SIZES.p, 3, _grid(), backend="cpp"),
        "cpp",
        True,
    ),
}
DEADLINE = float(os.environ.get("RECTOK_BENCH_DEADLINE", "inf"))  # epoch seconds, set by gpu_suite.sh
SUMMARY_OPS = [
    "posterior_flow",
    "flow_matching_loss",
    "cosine_align_loss",
    "gather_tokens",
    "restore_tokens",
    "patchify",
]


def _params():
    scope = os.environ.get("RECTOK_BENCH_SCOPE", "default")
    if scope not in ("summary", "default", "full"):
        raise ValueError(f"RECTOK_BENCH_SCOPE must be summary, default or full, got {scope!r}")
    summary_only = scope == "summary"  # the summary reads only fwd+bwd at B = 256, bf16
    if DRY:
        names, dtypes, batches = SUMMARY_OPS, ["bf16"], [2]
        summary_only = True
    elif not HAS_CUDA:
        names, dtypes, batches = list(OPS), ["bf16", "fp32"], [2, 8]
    elif scope == "summary":
        names, dtypes, batches = SUMMARY_OPS, ["bf16"], [256]
    elif scope == "default":
        names, dtypes, batches = list(OPS), ["bf16", "fp32"], [256]
    else:
        names, dtypes, batches = list(OPS), ["bf16", "fp32"], [64, 256]
    # most important first (bf16, B = 256, the summary ops, fwd+bwd), so a deadline cuts the least useful
    names = [n for n in SUMMARY_OPS if n in names] + [n for n in names if n not in SUMMARY_OPS]
    out = []
    for dt in dtypes:
        for B in sorted(batches, reverse=True):
            for name in names:
                modes = ["fwd+bwd", "fwd"] if OPS[name][4] else ["fwd"]
                if summary_only:
                    modes = modes[:1]
                for mode in modes:
                    out.append(pytest.param(name, mode, dt, B, id=f"{name}-{mode.replace('+', '')}-{dt}-B{B}"))
    return out


PARAMS = _params()


# ---------------------------------------------------------------- measurement


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _grad_outputs(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator(device=outs[0].device).manual_seed(0)
    res = []
    for o in outs:
        if o.dim() == 0:
            res.append(torch.ones_like(o))
        else:
            res.append(torch.randn(o.shape, generator=g, device=o.device, dtype=torch.float32).to(o.dtype))
    return res


def _runner(fn, case: Case, grad: bool, gouts: list[torch.Tensor] | None):
    """A no-argument callable running one forward (``grad=False``) or forward + backward."""
    if not grad:
        return lambda: fn(*case.args)

    def step():
        outs = [o for o in _flat(fn(*case.args)) if o.requires_grad]
        return torch.autograd.grad(outs, case.grad_inputs, gouts[: len(outs)])

    return step


def _grad_outs_for(eager, case: Case) -> list[torch.Tensor]:
    outs = [o for o in _flat(eager(*case.args)) if o.requires_grad]
    return _grad_outputs(outs)


def _check_fused(fused, eager, case: Case, expect_backend: str) -> str | None:
    """Run the fused op once: it must take the fused path and (for deterministic ops) agree with
    the reference; returns the recorded backend."""
    with torch.no_grad():
        got = _flat(fused(*case.args))
        backend = rectok_fast.last_backend()
        want = _flat(eager(*case.args))
    assert backend == expect_backend, f"fused op ran on {backend!r}, expected {expect_backend!r}"
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape, (a.shape, b.shape)
        assert torch.isfinite(a.float()).all()
        if case.exact:
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    return backend


def _info_common(op, mode, dtype, B, case, copy_bw):
    grad = mode == "fwd+bwd"
    nbytes = case.bytes_fwd + (case.bytes_bwd if grad else 0)
    return {
        "op": op,
        "mode": mode,
        "dtype": dtype,
        "B": B,
        "shape": case.shape,
        "scale": SCALE,
        "device": copy_bw["device"],
        "bytes": nbytes,
        "bytes_fwd": case.bytes_fwd,
        "bytes_bwd": case.bytes_bwd if grad else 0,
        "copy_gbps": copy_bw["copy_gbps"],
    }


def _record(info: dict, name: str, t: dict | None, peak: float | None, copy_gbps: float):
    if t is None:
        info[f"{name}_ms"] = None
        return
    info[f"{name}_ms"] = t["ms"]
    info[f"{name}_ms_p20"] = t["ms_p20"]
    info[f"{name}_ms_p80"] = t["ms_p80"]
    info[f"{name}_gbps"] = gbps(info["bytes"], t["ms"])
    info[f"{name}_frac_copy_bw"] = info[f"{name}_gbps"] / copy_gbps if copy_gbps else None
    info[f"{name}_peak_mb"] = peak


@pytest.mark.parametrize("op,mode,dtype,B", PARAMS)
def test_fused(benchmark, copy_bw, op, mode, dtype, B):
    build, eager, make_fused, backend, _ = OPS[op]
    if time.time() > DEADLINE:
        pytest.skip("the suite's time budget ran out (RECTOK_BENCH_DEADLINE)")
    if backend == "triton" and not HAS_CUDA and not DRY:
        pytest.skip(TRITON_SKIP)
    ops, why = import_ops()
    if ops is None:
        pytest.skip(why)
    try:
        getattr(ops, op)
    except (AttributeError, ModuleNotFoundError) as e:
        pytest.skip(f"rectok_fast.ops.{op} is not available: {e}")
    fused = make_fused(ops)
    grad = mode == "fwd+bwd"
    torch.manual_seed(0)
    case = build(B, DTYPES[dtype], DEVICE, grad, SIZES)
    info = _info_common(op, mode, dtype, B, case, copy_bw)
    info["fused_backend"] = _check_fused(fused, eager, case, backend)
    gouts = _grad_outs_for(eager, case) if grad else None

    run_fused = _runner(fused, case, grad, gouts)
    t_fused = benchmark.pedantic(lambda: time_ms(run_fused), rounds=1, iterations=1, warmup_rounds=0)
    _record(info, "fused", t_fused, peak_mb(run_fused), copy_bw["copy_gbps"])

    run_eager = _runner(eager, case, grad, gouts)
    _record(info, "eager", time_ms(run_eager), peak_mb(run_eager), copy_bw["copy_gbps"])

    if HAS_CUDA or DRY:
        import torch._dynamo as dynamo

        dynamo.reset()
        info["compile_backend"] = COMPILE_BACKEND
        try:
            compiled = torch.compile(eager, dynamic=False, backend=COMPILE_BACKEND)
            run_compiled = _runner(compiled, case, grad, gouts)
            for _ in range(2):
                run_compiled()
            _record(info, "compiled", time_ms(run_compiled), peak_mb(run_compiled), copy_bw["copy_gbps"])
        except Exception as e:  # a compiler failure is a result to report, not a benchmark failure
            info["compiled_ms"] = None
            info["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    else:
        info["compiled_ms"] = None
        info["compiled_skip"] = (
            "torch.compile(reference) is timed on the GPU only (CPU compile time exceeds the CPU budget)"
        )

    info["frac_copy_bw"] = info.get("fused_frac_copy_bw")
    if info.get("eager_ms"):
        info["speedup_vs_eager"] = info["eager_ms"] / info["fused_ms"]
    if info.get("compiled_ms"):
        info["speedup_vs_compiled"] = info["compiled_ms"] / info["fused_ms"]
    benchmark.extra_info.update(info)
    assert info["fused_ms"] > 0


@pytest.mark.parametrize("op,mode,dtype,B", [p for p in PARAMS if OPS[p.values[0]][3] == "triton"])
def test_reference_cpu(benchmark, copy_bw, op, mode, dtype, B):
    """CPU-only: the eager reference of the Triton ops at small sizes (the fused side skips)."""
    if HAS_CUDA or DRY:
        pytest.skip(
            "CPU-only case: on a GPU (and in dry runs) the reference is timed beside the fused op in test_fused"
        )
    build, eager, _, _, _ = OPS[op]
    grad = mode == "fwd+bwd"
    torch.manual_seed(0)
    case = build(B, DTYPES[dtype], DEVICE, grad, SIZES)
    info = _info_common(op, mode, dtype, B, case, copy_bw)
    gouts = _grad_outs_for(eager, case) if grad else None
    run_eager = _runner(eager, case, grad, gouts)
    t = benchmark.pedantic(lambda: time_ms(run_eager), rounds=1, iterations=1, warmup_rounds=0)
    _record(info, "eager", t, None, copy_bw["copy_gbps"])
    info.update(fused_ms=None, fused_skip=TRITON_SKIP, compiled_ms=None, compiled_skip=TRITON_SKIP)
    benchmark.extra_info.update(info)
    assert info["eager_ms"] > 0


# ---------------------------------------------------------------- distmat_align_loss (compute-bound: FLOP/s)
# VA-VAE's distance-matrix term: two B·N²·D Gram computations per pass, so the cases report FLOP/s
# against the dense bf16 matrix rate (common.PEAK_BF16_TFLOPS, and the GEMM ceiling measured in the
# same suite run when there is one) besides bytes.  FLOPs are the minimal useful count for all three
# implementations (symmetric forward, no tile padding: distmat_align_flops(...)["minimum"]); the
# fused kernels' own count (tile padding included) is recorded as ``flops_kernel`` (a prediction).

DISTMAT_MARGIN = 0.25  # VA-VAE's distance-matrix margin


def _distmat_params():
    if DRY:
        return [pytest.param("fwd+bwd", "bf16", 2, id="distmat_align_loss-fwdbwd-bf16-B2")]
    batches = [256] if HAS_CUDA else [2]
    modes = ["fwd+bwd", "fwd"] if os.environ.get("RECTOK_BENCH_SCOPE", "default") != "summary" else ["fwd+bwd"]
    return [
        pytest.param(mode, dt, B, id=f"distmat_align_loss-{mode.replace('+', '')}-{dt}-B{B}")
        for dt in ("bf16", "fp32")
        for B in batches
        for mode in modes
    ]


@pytest.mark.parametrize("mode,dtype,B", _distmat_params())
def test_distmat_align_loss(benchmark, copy_bw, mode, dtype, B):
    from common import mfu_both

    if time.time() > DEADLINE:
        pytest.skip("the suite's time budget ran out (RECTOK_BENCH_DEADLINE)")
    if not HAS_CUDA and not DRY:
        pytest.skip(TRITON_SKIP)
    ops, why = import_ops()
    if ops is None or not hasattr(ops, "distmat_align_loss"):
        pytest.skip(why or "rectok_fast.ops.distmat_align_loss is not available")
    from rectok_fast.ops.distmat import distmat_align_flops

    grad = mode == "fwd+bwd"
    dt = DTYPES[dtype]
    N, D = SIZES.N, SIZES.D  # student projected to the teacher width, as in VA-VAE (D = Dt)
    s = torch.finfo(dt).bits // 8
    torch.manual_seed(0)
    student = torch.randn(B, N, D, device=DEVICE, dtype=dt, requires_grad=grad)
    teacher = torch.randn(B, N, D, device=DEVICE, dtype=dt)
    bnd = B * N * D
    # fwd: read both inputs; bwd: read both again (and the norms), write dstudent
    case = Case((student, teacher), [student], 2 * bnd * s + 8 * B * N, 3 * bnd * s + 8 * B * N,
                f"student/teacher ({B}, {N}, {D})", True)  # fmt: skip
    eager = lambda a, b: ref.distmat_align_loss(a, b, DISTMAT_MARGIN)  # noqa: E731
    fused = lambda a, b: ops.distmat_align_loss(a, b, DISTMAT_MARGIN, backend="triton")  # noqa: E731
    info = _info_common("distmat_align_loss", mode, dtype, B, case, copy_bw)
    fl = distmat_align_flops(B, N, D, D, backward=grad)
    info.update(flops=fl["minimum"], flops_kernel=fl["flops"], flops_kernel_label="prediction", margin=DISTMAT_MARGIN)
    info["fused_backend"] = _check_fused(fused, eager, case, "triton")
    gouts = _grad_outs_for(eager, case) if grad else None

    run_fused = _runner(fused, case, grad, gouts)
    t_fused = benchmark.pedantic(lambda: time_ms(run_fused), rounds=1, iterations=1, warmup_rounds=0)
    _record(info, "fused", t_fused, peak_mb(run_fused), copy_bw["copy_gbps"])
    run_eager = _runner(eager, case, grad, gouts)
    _record(info, "eager", time_ms(run_eager), peak_mb(run_eager), copy_bw["copy_gbps"])

    import torch._dynamo as dynamo

    dynamo.reset()
    info["compile_backend"] = COMPILE_BACKEND
    try:
        compiled = torch.compile(eager, dynamic=False, backend=COMPILE_BACKEND)
        run_compiled = _runner(compiled, case, grad, gouts)
        for _ in range(2):
            run_compiled()
        _record(info, "compiled", time_ms(run_compiled), peak_mb(run_compiled), copy_bw["copy_gbps"])
    except Exception as e:  # a compiler failure is a result to report, not a benchmark failure
        info["compiled_ms"] = None
        info["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"

    for name in ("fused", "eager", "compiled"):
        ms = info.get(f"{name}_ms")
        if ms:
            m = mfu_both(info["flops"], ms * 1e-3)
            info[f"{name}_tflops"] = m["tflops"]
            info[f"{name}_frac_bf16_peak"] = m["mfu"]
            info[f"{name}_frac_gemm"] = m["mfu_gemm"]
    info["peak_tflops"] = mfu_both(1.0, 1.0)["peak_tflops"]
    info["frac_copy_bw"] = info.get("fused_frac_copy_bw")
    if info.get("eager_ms"):
        info["speedup_vs_eager"] = info["eager_ms"] / info["fused_ms"]
    if info.get("compiled_ms"):
        info["speedup_vs_compiled"] = info["compiled_ms"] / info["fused_ms"]
    benchmark.extra_info.update(info)
    assert info["fused_ms"] > 0
