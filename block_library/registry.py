"""Variant families by name: each kind's initializer and the calibration statistics it needs.

A new variant family is one file with an ``init_<kind>(module, parent_block, variant, stats)``
function and one line in ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from block_library.attention import init_gqa
from block_library.calibration import CalibrationStats
from block_library.ffn import init_swiglu
from block_library.linear import init_linear
from block_library.no_op import init_no_op
from block_library.variant import Variant
from puzzle.errors import ConfigError

Initializer = Callable[[nn.Module, nn.Module, Variant, "CalibrationStats | None"], None]


@dataclass(frozen=True)
class Family:
    kind: str
    init: Initializer
    """Sets the variant module's weights from the parent's block (and calibration statistics)."""
    needs: tuple[str, ...] = ()
    """Calibration statistics the initializer reads: ``ffn_importance``, ``lsq``."""


FAMILIES: dict[str, Family] = {
    "gqa": Family("gqa", init_gqa),
    "swiglu": Family("swiglu", init_swiglu, needs=("ffn_importance",)),
    "linear": Family("linear", init_linear, needs=("lsq",)),
    "no_op": Family("no_op", init_no_op),
}


def family_of(variant: Variant) -> Family:
    try:
        return FAMILIES[variant.kind]
    except KeyError:
        raise ConfigError(f"no variant family {variant.kind!r}; known: {sorted(FAMILIES)}") from None


def initialize(module: nn.Module, parent_block: nn.Module, variant: Variant, stats: CalibrationStats | None) -> nn.Module:
    """Initialize ``module`` in place from the parent; the parent's own variant is copied as is."""
    if variant.is_parent:
        own = module.state_dict()
        module.load_state_dict({k: v for k, v in parent_block.state_dict().items() if k in own}, strict=True)
        return module
    family_of(variant).init(module, parent_block, variant, stats)
    return module
