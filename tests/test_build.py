"""Build and packaging checks: build_info, ``python -m rectok_fast.env``, the kernels subpackage,
and that importing the package neither initialises CUDA nor needs a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import rectok_fast

BOOL_KEYS = ("triton_interpret", "cpu_extension", "cuda_extension_compiled", "cuda_available")
STR_KEYS = ("version", "torch_version")
OPTIONAL_STR_KEYS = ("torch_cuda", "triton_version", "extension_error")


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    # Run from an unrelated directory so the source tree is not on sys.path by accident.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_build_info_keys_and_types():
    info = rectok_fast.build_info()
    for k in BOOL_KEYS:
        assert isinstance(info[k], bool), k
    for k in STR_KEYS:
        assert isinstance(info[k], str) and info[k], k
    for k in OPTIONAL_STR_KEYS:
        assert info[k] is None or isinstance(info[k], str), k
    assert info["version"] == rectok_fast.__version__
    assert isinstance(info["attention_backends"], list)
    assert all(isinstance(b, str) for b in info["attention_backends"])
    # consistency: the CUDA flag can only be set when the extension itself loaded
    assert not info["cuda_extension_compiled"] or info["cpu_extension"]
    assert (info["extension_error"] is None) == info["cpu_extension"]
    json.dumps(info)  # serialisable as is


def test_extension_built_and_registers_ops():
    info = rectok_fast.build_info()
    if not info["cpu_extension"]:
        pytest.skip(f"C++ extension not built here: {info['extension_error']}")
    import torch

    assert hasattr(torch.ops.rectok_fast, "patchify") and hasattr(torch.ops.rectok_fast, "unpatchify")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rectok_fast::patchify", "CPU")
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("rectok_fast::patchify", "CUDA")
    assert has_cuda_kernel == info["cuda_extension_compiled"]


def test_env_module_prints_json(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "rectok_fast.env"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["version"] == rectok_fast.__version__
    for k in BOOL_KEYS:
        assert isinstance(info[k], bool)


def test_kernels_is_a_subpackage_not_top_level(tmp_path):
    out = _run(
        "import importlib.util, json, rectok_fast.kernels as k;"
        "print(json.dumps({'top': importlib.util.find_spec('kernels') is not None, 'name': k.__name__}))",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["name"] == "rectok_fast.kernels"
    assert not res["top"], "a top-level `kernels` module is importable: the package leaks it into site-packages"


def test_import_does_not_initialise_cuda(tmp_path):
    code = (
        "import json, torch, rectok_fast;"
        "a = torch.cuda.is_initialized();"
        "import rectok_fast.ops.patchify;"  # loads the C++/CUDA extension and registers fakes/autograd
        "b = torch.cuda.is_initialized();"
        "print(json.dumps([a, b]))"
    )
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, False]


def test_extension_built_for_the_running_torch():
    """The recorded build matches the running torch (two environments never share one ``_C*.so``)."""
    if not rectok_fast.build_info()["cpu_extension"]:
        pytest.skip(f"C++ extension not built here: {rectok_fast.extension_error()}")
    import torch

    assert rectok_fast.build_config()["torch_version_at_build"] == torch.__version__


def _fresh_extension_module(monkeypatch, tmp_path, record: dict | None):
    """A fresh copy of :mod:`rectok_fast._extension` reading ``record`` as its build config."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ext_copy", rectok_fast._extension.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = tmp_path / "_build_config.json"
    if record is not None:
        cfg.write_text(json.dumps(record))
    monkeypatch.setattr(mod, "_BUILD_CONFIG", str(cfg))
    return mod


def test_extension_for_another_torch_is_refused(monkeypatch, tmp_path):
    mod = _fresh_extension_module(monkeypatch, tmp_path, {"torch_version_at_build": "0.0.1+other"})
    monkeypatch.delenv(mod.REQUIRE_ENV, raising=False)
    assert mod.load_extension() is None
    err = mod.extension_error()
    assert "built for torch 0.0.1+other" in err and "rebuild" in err


def test_required_extension_missing_raises(monkeypatch, tmp_path):
    mod = _fresh_extension_module(monkeypatch, tmp_path, {"torch_version_at_build": "0.0.1+other"})
    monkeypatch.setenv(mod.REQUIRE_ENV, "1")
    with pytest.raises(mod.ExtensionError, match="RECTOK_FAST_REQUIRE_EXTENSION=1"):
        mod.load_extension()
    # extension_error() reports the reason without raising
    assert "0.0.1+other" in mod.extension_error()


def test_required_extension_present_loads(monkeypatch, tmp_path):
    if not rectok_fast.build_info()["cpu_extension"]:
        pytest.skip(f"C++ extension not built here: {rectok_fast.extension_error()}")
    import torch

    mod = _fresh_extension_module(monkeypatch, tmp_path, {"torch_version_at_build": torch.__version__})
    monkeypatch.setenv(mod.REQUIRE_ENV, "1")
    assert mod.load_extension() is not None


@pytest.mark.parametrize(("version", "needed"), [("3.5.1", True), ("3.6.0", True), ("3.7.0", False), ("3.8.0", False), ("4.0.0", False), ("3.10.0", False)])
def test_interpreter_shim_only_for_old_triton(version, needed):
    from rectok_fast._triton_compat import needs_index_shim

    assert needs_index_shim(version) is needed


def test_interpreter_runs_runtime_bound_loops():
    """A kernel looping over a runtime bound runs under the interpreter on every supported triton/numpy
    (triton 3.6 with numpy >= 2.4 needs rectok_fast's shim)."""
    from rectok_fast._backend import triton_interpret

    if not triton_interpret():
        pytest.skip("runs under TRITON_INTERPRET=1 only")
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _sum_kernel(X, OUT, n, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in range(0, n, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            acc += tl.load(X + offs, mask=offs < n, other=0.0)
        tl.store(OUT, tl.sum(acc, 0))

    x = torch.arange(37, dtype=torch.float32)
    out = torch.zeros(1)
    _sum_kernel[(1,)](x, out, x.numel(), BLOCK=16)
    assert out.item() == x.sum().item()
