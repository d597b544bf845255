"""Only ``@triton.jit`` kernels live here (installed as ``rectok_fast.kernels``): no autograd, no allocation.

Launchers, validation and op registration are in :mod:`rectok_fast.ops`, which imports these
modules on the first Triton launch (:func:`rectok_fast._backend.kernels`), never at import: triton
is optional until a kernel runs.  The modules import nothing from ``rectok_fast`` but each other;
:mod:`._stream` (the noise stream's constants) imports nothing at all, so the ops read it without
triton.  See ARCHITECTURE.md for the op each module serves.
"""
