"""A stand-in Triton driver: compile for sm_90 on a machine without a GPU (used by :mod:`benchmarks.kernel_report`).

:func:`activate` installs a driver whose target is ``GPUTarget("cuda", 90, 32)`` and wraps
``JITFunction.run`` so that a launch (``kernel[grid](...)``) compiles the kernel for that target
with the launch's exact arguments, records it (kernel, grid, bound arguments, specialisation,
``num_warps``, the ``ptxas -v`` log) and returns without running anything.  Works with triton 3.6
and 3.8 (the two differ only in details handled below: TTIR argument names, ``_call_hook``).

Call :func:`prepare_environment` before the kernels are imported: ``@triton.jit`` decides at
decoration time between the interpreter and the compiler (``TRITON_INTERPRET``), and the ptxas log
is only printed on a fresh compile (a private, empty cache directory).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import tempfile


def prepare_environment() -> None:
    """Unset TRITON_INTERPRET (compile, do not interpret), use a fresh Triton cache, print ptxas logs."""
    if "rectok_fast.kernels" in __import__("sys").modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError(
            "the kernels were imported under TRITON_INTERPRET=1; run the report in a fresh process "
            "(python -m benchmarks.kernel_report)"
        )
    os.environ.pop("TRITON_INTERPRET", None)
    cache = tempfile.mkdtemp(prefix="kernel_report_triton_")
    atexit.register(shutil.rmtree, cache, True)
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


class StandIn:
    """State of the active stand-in: launch listeners and the keys-only switch."""

    def __init__(self):
        self.listeners: list = []
        self.keys_only = False
        self.logs: dict = {}  # (kernel name, cache key) -> ptxas log


_STATE: StandIn | None = None


def _make_driver():
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        """Answers what Triton asks before compiling; anything that would touch a GPU raises."""

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            try:
                from triton.backends.nvidia.driver import ty_to_cpp

                return ty_to_cpp(ty)
            except Exception:
                return ty

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_benchmarker(self):
            raise RuntimeError("stand-in driver: nothing can be timed without a GPU")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_device_capability(self, device=None):
            return (9, 0)

        def get_device_interface(self):
            raise RuntimeError("stand-in driver: no device interface")

    return StandInDriver()


def _signature(compiled, param_names) -> tuple[str, dict, list]:
    """('NAME: type[:16], ...', constexprs {name: value}, names of the runtime arguments in order)."""
    src = compiled.src
    sig = dict(getattr(src, "signature", {}) or {})
    consts = {}
    for k, v in (getattr(src, "constants", {}) or {}).items():
        idx = k[0] if isinstance(k, tuple) else k
        name = param_names[idx] if isinstance(idx, int) and idx < len(param_names) else str(idx)
        consts[name] = getattr(v, "value", v)
        consts[name] = consts[name] if isinstance(consts[name], (int, float, bool, str)) else str(consts[name])
    div = set()
    for k, v in (getattr(src, "attrs", {}) or {}).items():
        idx = k[0] if isinstance(k, tuple) else k
        if any("divisibility" in str(a) for a in v):
            div.add(param_names[idx] if isinstance(idx, int) and idx < len(param_names) else idx)
    parts, runtime = [], []
    for name, ty in sig.items():
        if ty == "constexpr":
            parts.append(f"{name}: constexpr={consts.get(name)}")
        else:
            runtime.append(name)
            parts.append(f"{name}: {ty}{':16' if name in div else ''}")
    return ", ".join(parts), consts, runtime


def activate() -> StandIn:
    """Install the stand-in driver and the launch capture (idempotent); returns the shared state."""
    global _STATE
    if _STATE is not None:
        return _STATE
    import triton
    from triton import knobs
    from triton.runtime.jit import JITFunction, compute_cache_key

    triton.runtime.driver.set_active(_make_driver())
    try:
        knobs.nvidia.dump_ptxas_log = True
    except Exception:  # older knobs layout: the environment variable set by prepare_environment
        pass
    state = StandIn()
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kw = dict(kwargs)
        kw["debug"] = kw.get("debug", self.debug) or knobs.runtime.debug
        kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = self.device_caches[0][4]
        bound_args, specialization, options = binder(*args, **kw)
        key = str(compute_cache_key({}, specialization, options))
        bound = dict(bound_args) if isinstance(bound_args, dict) else dict(zip(self.arg_names, bound_args))
        g = grid(bound) if callable(grid) else grid
        g = tuple(int(x) for x in g) + (1,) * (3 - len(g))
        name = self.fn.__name__
        if state.keys_only:
            compiled, log = None, None
        else:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                compiled = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
            if hasattr(compiled, "result"):  # async compile mode
                compiled = compiled.result()
            log = buf.getvalue()
            if "ptxas info" in log:
                state.logs[(name, key)] = log
            log = state.logs.get((name, key), log)
        launch = {
            "name": name,
            "key": key,
            "grid": g,
            "args": bound,
            "compiled": compiled,
            "ptxas_log": log,
            "num_warps": None,
            "signature": None,
            "constexprs": None,
            "runtime_arg_names": None,
        }
        if compiled is not None:
            launch["num_warps"] = compiled.metadata.num_warps
            launch["signature"], launch["constexprs"], launch["runtime_arg_names"] = _signature(
                compiled, self.arg_names
            )
        for cb in list(state.listeners):
            cb(launch)
        return compiled

    JITFunction.run = run
    _STATE = state
    return state
