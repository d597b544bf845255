"""Test configuration.

On a machine without CUDA, Triton kernels run through the interpreter: ``TRITON_INTERPRET=1`` must
be set before any ``@triton.jit`` kernel is decorated, i.e. before ``rectok_fast`` is imported.
On a GPU machine the same tests run the compiled kernels (set ``RECTOK_FAST_TEST_INTERPRET=1`` to
force the interpreter there too).
"""

from __future__ import annotations

import os


def _cuda_present() -> bool:
    # Avoid importing torch.cuda machinery before the env var is decided; nvidia-smi style check.
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


if os.environ.get("RECTOK_FAST_TEST_INTERPRET") == "1" or not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Device on which Triton kernels run in tests: the GPU when there is one, else the CPU interpreter.
KERNEL_DEVICE = "cuda" if (HAS_CUDA and not INTERPRET) else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_only: needs a CUDA device")
    config.addinivalue_line("markers", "triton_gpu: runs Triton kernels on a GPU (not the interpreter)")
    config.addinivalue_line("markers", "gpu_smoke: one case per op, run by gpu_suite.sh's GPU test step")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    skip_tgpu = pytest.mark.skip(reason="needs Triton on a GPU (running under TRITON_INTERPRET on CPU)")
    for item in items:
        if "cuda_only" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "triton_gpu" in item.keywords and (not HAS_CUDA or INTERPRET):
            item.add_marker(skip_tgpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny matmuls gain nothing from threads, and on a shared 2-core machine OpenMP spinning makes them
    up to ~100x slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
