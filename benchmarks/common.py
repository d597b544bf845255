"""Timing, memory and bandwidth helpers shared by the benchmark suites.

GPU timings use CUDA events through :func:`triton.testing.do_bench` (median of the timed runs; it
runs warm-up calls and clears the L2 cache before every timed run, so inputs smaller than L2 are
not flattered by cache hits).  CPU timings are ``time.perf_counter`` medians.  Every number a case
measures goes into ``benchmark.extra_info`` and the suite's pytest-benchmark JSON; the
summariser (``benchmarks/summarize.py``) reads only that JSON.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

# ``RECTOK_BENCH_DRY=1`` (``gpu_suite.sh dry``): every case runs its logic at toy sizes on the CPU,
# Triton kernels under the interpreter; the numbers are tagged ``scale: dry`` and never summarised.
DRY = os.environ.get("RECTOK_BENCH_DRY", "0") == "1"
HAS_CUDA = torch.cuda.is_available() and not DRY
PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16 tensor-core peak (datasheet)
# torch.compile backend of the baselines and the e2e cases: inductor, or "eager" in dry runs (dynamo
# still traces, so graph breaks and tracing errors show; CPU code generation would not fit 3 minutes)
COMPILE_BACKEND = os.environ.get("RECTOK_BENCH_COMPILE_BACKEND", "eager" if DRY else "inductor")
TRITON_SKIP = "Triton kernels need a GPU; interpreter timings are meaningless"
GPU_ONLY_SKIP = "needs a CUDA GPU (this machine has none)"


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def commit() -> str | None:
    """The measured commit: ``RECTOK_FAST_COMMIT`` (set by gpu_suite.sh when the tree has no .git),
    else ``git rev-parse HEAD`` (with ``-dirty`` when tracked files differ), else None."""
    env = os.environ.get("RECTOK_FAST_COMMIT")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=root, text=True, stderr=subprocess.DEVNULL
        ).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root, stderr=subprocess.DEVNULL).returncode
    except Exception:
        return None
    return head + ("-dirty" if dirty == 1 else "")


def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    return {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda}


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def gpu_time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> dict:
    """Median / 20th / 80th percentile milliseconds of ``fn`` with CUDA events (triton do_bench)."""
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": float(p50), "ms_p20": float(p20), "ms_p80": float(p80)}


def cpu_time_ms(fn: Callable[[], object], reps: int = 7, warmup: int = 1) -> dict:
    """Median / 20th / 80th percentile milliseconds of ``fn`` over ``reps`` calls (``time.perf_counter``)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    q = lambda f: ts[round(f * (len(ts) - 1))]  # noqa: E731
    return {"ms": statistics.median(ts), "ms_p20": q(0.2), "ms_p80": q(0.8)}


def time_ms(fn: Callable[[], object], **kw) -> dict:
    if HAS_CUDA:
        return gpu_time_ms(fn, **kw)
    return cpu_time_ms(fn, reps=3) if DRY else cpu_time_ms(fn)


def peak_mb(fn: Callable[[], object]) -> float | None:
    """Extra GPU memory (MiB) one call of ``fn`` allocates at its peak, above what was live before."""
    if not HAS_CUDA:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth() -> dict:
    """Device-to-device copy bandwidth in GB/s counting bytes read + written (the roofline the
    memory-bound ops are compared with).  GPU: 1 GiB buffers, CUDA events; CPU: 64 MiB, perf_counter."""
    if HAS_CUDA:
        n = 2**30
        src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        t = gpu_time_ms(lambda: dst.copy_(src), warmup=50, rep=300)
        del src, dst
        torch.cuda.empty_cache()
    else:
        n = 64 * 2**20
        src = torch.ones(n, dtype=torch.uint8)
        dst = torch.empty_like(src)
        t = cpu_time_ms(lambda: dst.copy_(src), reps=9, warmup=2)
    gbps = 2 * n / (t["ms"] * 1e-3) / 1e9
    return {"copy_gbps": gbps, "copy_bytes": 2 * n, "copy_ms": t["ms"], "device": device_name()}


def gemm_ceiling() -> dict:
    """The matmul ceiling measured here: bf16 8192³ ``torch.mm`` on random data (CUDA events, median;
    three operand pairs rotated so no product repeats a cached input); dry/CPU: fp32 256³."""
    if HAS_CUDA:
        n, dtype = 8192, torch.bfloat16
        pairs = [
            (torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype))
            for _ in range(3)
        ]
        out = torch.empty(n, n, device="cuda", dtype=dtype)
        i = [0]

        def mm():
            a, b = pairs[i[0] % 3]
            i[0] += 1
            torch.mm(a, b, out=out)

        t = gpu_time_ms(mm, warmup=100, rep=400)
        del pairs, out
        torch.cuda.empty_cache()
    else:
        n, dtype = 256, torch.float32
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = cpu_time_ms(lambda: a @ b, reps=9, warmup=2)
    tflops = 2 * n**3 / (t["ms"] * 1e-3) / 1e12
    return {"gemm_tflops": tflops, "gemm_n": n, "gemm_dtype": str(dtype).removeprefix("torch."), "gemm_ms": t["ms"]}


def suite_env() -> dict:
    """The ``env`` JSON the suite wrote this run (``RECTOK_SUITE_ENV``), or {} outside the suite."""
    path = os.environ.get("RECTOK_SUITE_ENV")
    if not path or not os.path.exists(path):
        return {}
    import json

    with open(path) as f:
        return json.load(f)


def measured_gemm_tflops() -> float | None:
    """The GEMM ceiling measured earlier in this suite run (``env.json``), if any."""
    v = suite_env().get("ceilings", {}).get("gemm_tflops")
    return float(v) if v else None


def mfu_both(flops: float, seconds: float) -> dict:
    """MFU against the 989 TFLOP/s datasheet figure and against the GEMM ceiling measured in the same
    suite run (None when the run measured none)."""
    gemm = measured_gemm_tflops()
    return {
        "tflops": flops / seconds / 1e12,
        "mfu": mfu(flops, seconds),
        "peak_tflops": PEAK_BF16_TFLOPS,
        "gemm_tflops": gemm,
        "mfu_gemm": mfu(flops, seconds, gemm) if gemm else None,
    }


def gbps(nbytes: int | None, ms: float | None) -> float | None:
    if nbytes is None or ms is None or ms <= 0:
        return None
    return nbytes / (ms * 1e-3) / 1e9


def mfu(flops: float, seconds: float, peak_tflops: float = PEAK_BF16_TFLOPS) -> float:
    """Model FLOP utilisation: achieved FLOP/s over the dense bf16 peak."""
    return flops / seconds / (peak_tflops * 1e12)


# --------------------------------------------------------------------------------------------
# Analytic matmul FLOPs (2 per multiply-add) of DiT^DH, method §4.  Attention's QK^T and AV count.


def _swiglu_hidden(width: int) -> int:
    return int(2 / 3 * 4 * width)


def ditdh_forward_flops(
    batch: int,
    tokens: int = 256,
    channels: int = 128,
    hidden: tuple[int, int] = (1152, 2048),
    depth: tuple[int, int] = (28, 2),
) -> float:
    """Matmul FLOPs of one DiT^DH forward on ``batch`` samples (XL defaults).

    Encoder block of width w (conditioned per sample): qkv 3w², proj w², SwiGLU 3·w·h per token,
    attention 2·N·w per token, adaLN w·6w per sample.  Head block of width W (conditioned per
    token): the same with adaLN W·6W per token.  Embedders: s/x 1×1 convs C·w and C·W, s_projector
    w·W, final adaLN W·2W and Linear W·C per token; the time/label embedders are per sample and
    negligible but counted (512·w + w·w).
    """
    w, W = hidden
    d0, d1 = depth
    N, C, B = tokens, channels, batch

    def block_macs_per_token(width: int) -> int:
        return 4 * width * width + 3 * width * _swiglu_hidden(width) + 2 * N * width

    macs = B * N * d0 * block_macs_per_token(w) + B * d0 * w * 6 * w
    macs += B * N * d1 * (block_macs_per_token(W) + W * 6 * W)
    macs += B * N * (C * w + C * W + w * W + W * 2 * W + W * C)
    macs += B * (512 * w + w * w)
    return 2.0 * macs


def ditdh_train_flops(batch: int, **kw) -> float:
    """Forward + backward (backward = 2× forward) matmul FLOPs of one training step."""
    return 3.0 * ditdh_forward_flops(batch, **kw)


def ditdh_sample_flops(batch: int, steps: int = 50, cfg: bool = True, **kw) -> float:
    """Matmul FLOPs of ``steps`` Euler updates; CFG evaluates the conditional and null batches."""
    return steps * ditdh_forward_flops(batch * (2 if cfg else 1), **kw)


# --------------------------------------------------------------------------------------------


def import_ops():
    """``(rectok_fast.ops, None)`` or ``(None, reason)`` when the fused ops cannot be imported."""
    try:
        import rectok_fast.ops as ops
    except Exception as e:  # written concurrently; a broken import is reported, not hidden
        return None, f"rectok_fast.ops does not import: {type(e).__name__}: {e}"
    return ops, None


def set_compile_limits() -> None:
    """Every case compiles its own static-shape graph; raise dynamo's per-function recompile cap."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 4096
