"""Benchmark configuration: session fixtures and the run's metadata in the benchmark JSON.

Unlike ``tests/``, the benchmarks never set ``TRITON_INTERPRET``: Triton cases run compiled on a
GPU and skip with a reason on a CPU-only machine.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

_RUN: dict = {}


@pytest.fixture(scope="session")
def copy_bw() -> dict:
    """Device-to-device copy bandwidth measured once in this session (the roofline of the ops)."""
    if "copy" not in _RUN:
        env = common.suite_env().get("ceilings", {})  # gpu_suite.sh measured it earlier in this run
        if env.get("copy_gbps") and env.get("device") == common.device_name():
            _RUN["copy"] = {k: env[k] for k in ("copy_gbps", "copy_bytes", "copy_ms", "device")}
        else:
            _RUN["copy"] = common.copy_bandwidth()
    return _RUN["copy"]


@pytest.fixture(scope="session", autouse=True)
def _compile_limits():
    common.set_compile_limits()
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Tag the JSON with what the summariser needs: device, versions, commit, copy bandwidth."""
    info = {"device": common.device_name(), "commit": common.commit(), "has_cuda": common.HAS_CUDA}
    info.update(common.versions())
    copy = _RUN.get("copy")
    info["copy_gbps"] = copy["copy_gbps"] if copy else None
    info["bench_scope"] = os.environ.get("RECTOK_BENCH_SCOPE", "default")
    info["dry"] = common.DRY
    info["gemm_tflops"] = common.measured_gemm_tflops()
    output_json["rectok_fast"] = info
