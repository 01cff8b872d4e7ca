"""The no-op family: the sub-block is removed; nothing to build, initialize or train."""

from __future__ import annotations

from torch import nn

from block_library.calibration import CalibrationStats
from block_library.variant import Variant


def init_no_op(module: nn.Module, parent_block: nn.Module, variant: Variant, stats: CalibrationStats | None) -> None:
    """Nothing to do: the module is the identity on the residual stream."""
