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
