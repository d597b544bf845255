"""One narrow shim for Triton's CPU interpreter (``TRITON_INTERPRET=1``) on triton < 3.7.

triton 3.6's interpreter converts a scalar tensor to a Python int with ``int(handle.data)``; its
``handle.data`` is a 1-element numpy array, and numpy >= 2.4 refuses ``int()`` of a non-0-d array
(``TypeError: only 0-dimensional arrays can be converted to Python scalars``). Every kernel loop
over a runtime bound (``for i in range(0, n, BLOCK)``) then fails under the interpreter. Upstream
fixed it after 3.6 (triton-lang/triton issue 9171) by squeezing the array first; this module makes
the same one-line change to the patched ``tensor.__index__`` of 3.6 and earlier, and to nothing
else. Compiled (GPU) kernels never go through this code. It is applied when ``rectok_fast`` is
imported with ``TRITON_INTERPRET`` set (how CI, the tests and ``gpu_suite.sh dry`` run kernels on
the CPU), so a numpy version never has to be pinned for triton 3.6.
"""

from __future__ import annotations

_APPLIED = False


def _version(v: str) -> tuple[int, int]:
    parts = v.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def needs_index_shim(triton_version: str) -> bool:
    """True for the triton releases whose interpreter has the ``int(handle.data)`` bug (< 3.7)."""
    return _version(triton_version) < (3, 7)


def apply_interpreter_shim() -> bool:
    """Patch triton < 3.7's interpreter so a scalar tensor's ``__index__`` squeezes first.

    Returns True when the shim is (or already was) in place, False when this triton needs none or
    has no interpreter hook of the expected shape (then nothing is touched).
    """
    global _APPLIED
    if _APPLIED:
        return True
    try:
        import triton
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - no triton: nothing to patch
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if not needs_index_shim(triton.__version__) or original is None:
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # The scope restores in reverse order, so this override is undone before the original one.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _APPLIED = True
    return True
