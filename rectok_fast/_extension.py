"""Loading the C++/CUDA extension ``rectok_fast._C`` (the ``torch.ops.rectok_fast`` patch ops).

One module owns this so that :mod:`rectok_fast.ops` does not import the package root (whose
``build_info`` imports :mod:`rectok_fast.nn`, which imports the ops: a layering back-edge).

The extension is optional: without it the patch ops run the PyTorch reference under
``backend="auto"`` and ``backend="cpp"`` raises.  Two things must never pass silently:

* an extension built against another torch than the one running (two environments sharing one
  editable checkout overwrite each other's in-place ``_C*.so``): it is refused with a message that
  says which torch built it and how to rebuild;
* a missing or refused extension where one is required: with ``RECTOK_FAST_REQUIRE_EXTENSION=1``
  (set in CI) :func:`load_extension` raises instead of returning None, so tests fail instead of
  skipping.
"""

from __future__ import annotations

import importlib
import json
import os

REQUIRE_ENV = "RECTOK_FAST_REQUIRE_EXTENSION"
_BUILD_CONFIG = os.path.join(os.path.dirname(__file__), "_build_config.json")

_EXT = None
_EXT_ERROR: str | None = None
_TRIED = False


class ExtensionError(ImportError):
    """The C++ extension is required (``RECTOK_FAST_REQUIRE_EXTENSION=1``) but missing or mismatched."""


def build_config() -> dict:
    """What ``setup.py`` recorded about the build (empty when it never ran here)."""
    if not os.path.exists(_BUILD_CONFIG):
        return {}
    with open(_BUILD_CONFIG) as f:
        return json.load(f)


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "0") not in ("", "0")


def _torch_mismatch() -> str | None:
    import torch

    built = build_config().get("torch_version_at_build")
    if built is not None and built != torch.__version__:
        return (
            f"rectok_fast._C was built for torch {built} but torch {torch.__version__} is running; "
            "rebuild it in this environment (`pip install -e . --no-build-isolation`), or give each "
            "environment its own checkout"
        )
    return None


def load_extension():
    """Import ``rectok_fast._C`` once; the module, or None when it is absent or refused.

    Raises :class:`ExtensionError` instead of returning None when ``RECTOK_FAST_REQUIRE_EXTENSION=1``.
    """
    global _EXT, _EXT_ERROR, _TRIED
    if not _TRIED:
        _TRIED = True
        mismatch = _torch_mismatch()
        if mismatch is not None:
            # Importing a .so built for another torch can crash the process or register ops with
            # another ABI: refuse before loading it.
            _EXT_ERROR = mismatch
        else:
            try:
                _EXT = importlib.import_module("rectok_fast._C")
            except ImportError as e:  # not built (a source tree without install) or a broken build
                _EXT_ERROR = f"rectok_fast._C could not be imported: {e}"
    if _EXT is None and _required():
        raise ExtensionError(f"{REQUIRE_ENV}=1 but the C++ extension is unavailable: {_EXT_ERROR}")
    return _EXT


def extension_error() -> str | None:
    """Why the extension is unavailable (None when it loaded)."""
    global _TRIED
    if not _TRIED:
        try:
            load_extension()
        except ExtensionError:
            pass
    return _EXT_ERROR
