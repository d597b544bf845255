"""Only ``@triton.jit`` kernels live here (installed as ``rectok_fast.kernels``): no autograd, no allocation.

Launchers, validation and op registration are in :mod:`rectok_fast.ops`.
"""
