"""Export of a runtime model to the DeciLM / nemotron-nas checkpoint format.

    export_decilm(model, out_dir, source_dir=parent_dir)     # an in-memory model
    export_decilm_dir(model_dir, out_dir)                     # streamed from a model directory

The names are imported on first use: ``puzzle.model`` builds its config on ``puzzle.export.remote`` (the DeciLM
config class every export ships), and importing that subpackage must not load the exporter, which loads models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from puzzle.export.decilm import export_decilm, export_decilm_dir, ffn_mult_for

__all__ = ["export_decilm", "export_decilm_dir", "ffn_mult_for"]


def __getattr__(name: str) -> object:
    if name in __all__:
        value = getattr(importlib.import_module("puzzle.export.decilm"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
