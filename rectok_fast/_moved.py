"""Aliases for public names that moved to another module: the old name keeps working and warns.

Use as a module-level ``__getattr__`` (PEP 562), which Python calls only for names the module does
not define, so the alias costs nothing on any other attribute::

    __getattr__ = moved_names(__name__, {"sample_time": "rectok_fast.schedules"})
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def moved_names(module: str, targets: dict[str, str]) -> Callable[[str], object]:
    """A ``__getattr__`` for ``module`` that resolves each name of ``targets`` (name -> new module)
    in its new module with a ``DeprecationWarning`` naming the new place; other names raise
    ``AttributeError`` as usual."""

    def __getattr__(name: str) -> object:
        new = targets.get(name)
        if new is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(
            f"{module}.{name} moved to {new}.{name}; the old name will be removed in a future release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new), name)

    return __getattr__
