"""Build rectok_fast and its C++/CUDA extension ``rectok_fast._C``.

* A ``CUDAExtension`` when torch is a CUDA build and a CUDA toolkit (nvcc) is found, else a
  ``CppExtension`` (CPU kernels only).  ``RECTOK_FAST_FORCE_CUDA=1`` makes a missing toolkit an
  error; ``RECTOK_FAST_SKIP_CUDA=1`` builds the CPU extension only.
* The toolkit is discovered here (``CUDA_HOME``/``CUDA_PATH``, then ``/usr/local/cuda*``, then
  ``nvcc`` on PATH resolved through symlinks) rather than trusting torch's guess, which can pick a
  wrapper script and then fail at link time.
* With no GPU visible the arch list defaults to ``9.0`` (Hopper); ``TORCH_CUDA_ARCH_LIST`` wins.
* ``MAX_JOBS`` defaults to min(cores, free GiB / 2).
* What was built is recorded in ``rectok_fast/_build_config.json`` (read by ``build_info()``).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """Locate a CUDA toolkit with a real ``bin/nvcc`` and ``include/cuda_runtime.h``."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda", "/opt/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        c = os.path.realpath(c)
        if os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except Exception:
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemAvailable")).split()[1])
        by_mem = max(1, int(kb / 1024 / 1024 / 2))
    except Exception:
        by_mem = cores
    return max(1, min(cores, by_mem))


def ext_modules_and_cmdclass():
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = not _truthy("RECTOK_FAST_SKIP_CUDA")
    cuda_home = find_cuda_home() if want_cuda else None
    use_cuda = bool(want_cuda and torch.version.cuda and cuda_home and cu_sources)
    if _truthy("RECTOK_FAST_FORCE_CUDA") and not use_cuda:
        raise RuntimeError(
            "RECTOK_FAST_FORCE_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda!r}, toolkit={cuda_home!r}, .cu sources={len(cu_sources)}"
        )
    cxx_flags = ["-O3"]  # torch picks the C++ standard it was built with (C++20 from 2.13)
    record = {
        "cpu_extension": True,
        "cuda_extension_compiled": use_cuda,
        "cuda_home": cuda_home,
        "nvcc_version": nvcc_version(cuda_home) if cuda_home else None,
        "torch_version_at_build": torch.__version__,
        "torch_cuda_at_build": torch.version.cuda,
    }
    if use_cuda:
        # Make torch's helpers use the toolkit we found, not their own guess.
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            gpu = False
            try:
                gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
            except Exception:
                gpu = False
            if not gpu:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        record["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
        ext = cpp_extension.CUDAExtension(
            "rectok_fast._C",
            cpp_sources + cu_sources,
            define_macros=[("RECTOK_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            library_dirs=[os.path.join(cuda_home, "lib64")],
        )
    else:
        ext = cpp_extension.CppExtension("rectok_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})
    os.makedirs(os.path.join(ROOT, "rectok_fast"), exist_ok=True)
    with open(os.path.join(ROOT, "rectok_fast", "_build_config.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"rectok_fast build: {json.dumps(record)}", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if any(a in sys.argv for a in ("egg_info", "dist_info", "--version", "clean")) and not any(
    a in sys.argv for a in ("build_ext", "develop", "editable_wheel", "bdist_wheel", "install")
):
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    packages=find_packages(include=["rectok_fast", "rectok_fast.*"]) + ["rectok_fast.kernels", "rectok_fast.configs"],
    # kernels/ and configs/ sit at the top of the repository and install inside the package
    package_dir={"rectok_fast.kernels": "kernels", "rectok_fast.configs": "configs"},
    package_data={"rectok_fast": ["_build_config.json"], "rectok_fast.configs": ["*/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
