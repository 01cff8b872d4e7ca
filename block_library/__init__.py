"""Per-layer block variants and block-wise local distillation (BLD).

    from block_library import LibraryConfig, build_library, train_library, open_library

    lib_dir = build_library("smollm2-135m", "runs/lib", LibraryConfig())   # initialize from the parent
    train_library(lib_dir)                                                 # BLD, resumable
    lib = open_library(lib_dir)
    print(lib.table)                                  # layer, sub-block, variant, params, init/final NMSE
    child = lib.assemble(blocks)                      # a runtime model from chosen variants

Modules: ``space`` (search space), ``variant`` (identity and module of a variant), one file per
family with its initializer (``attention``, ``ffn``, ``linear``, ``no_op``) and ``registry``;
``calibration`` and ``teacher`` (parent activations), ``build`` and ``bld`` (the two stages),
``checkpoint``, ``artifact`` (the directory), ``distributed`` (torchrun sharding).
"""

from block_library.artifact import Library, is_library, open_library
from block_library.bld import train_library
from block_library.build import build_library
from block_library.config import BLDConfig, LibraryConfig
from block_library.space import AttentionSpace, FFNSpace, LayerOverride, SearchSpace
from block_library.variant import Variant

__all__ = [
    "AttentionSpace", "BLDConfig", "FFNSpace", "LayerOverride", "Library", "LibraryConfig", "SearchSpace",
    "Variant", "build_library", "is_library", "open_library", "train_library",
]
