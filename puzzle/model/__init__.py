"""The heterogeneous runtime: ``PuzzleConfig`` + ``PuzzleForCausalLM``."""

from __future__ import annotations

from puzzle.model.configuration import PuzzleConfig
from puzzle.model.modeling import HeterogeneousForCausalLM


class PuzzleForCausalLM(HeterogeneousForCausalLM):
    """The runtime model. Save with ``save_pretrained``; load with ``puzzle.load_model``."""

    config_class = PuzzleConfig


__all__ = ["PuzzleConfig", "PuzzleForCausalLM"]
