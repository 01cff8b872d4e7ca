"""puzzle: distillation-based NAS that turns a Llama-family parent into a faster heterogeneous child.

``puzzle.search(...)`` runs the whole search (see :mod:`puzzle.search`); the subpackage is imported
on first use, so ``import puzzle`` stays light (no torch, no pandas).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = ("search",)


def __getattr__(name: str) -> object:
    if name in _LAZY:  # importing the subpackage binds it as this module's attribute
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
