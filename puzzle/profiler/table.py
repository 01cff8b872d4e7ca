"""The cost table: what every (layer, block variant) costs on a target, in the format the MIP reads.

One row per layer and block label ``ATTENTION|FFN`` (every attention variant x every FFN variant
of the layer), with ``params`` (whole layer), ``weight_bytes`` and ``kv_bytes_per_token`` (on the
most loaded tensor-parallel rank: what must fit in one GPU), ``<scenario>_ms`` per scenario and
``is_parent``; plus the ``layer = -1, variant = fixed`` row for the embedding, final norm and LM
head. See :mod:`solvers.io` for the format. Costs depend on the variant, not on the layer, so each
distinct block is costed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from puzzle.engines import allowed, engine_rules
from puzzle.profiler.counts import (ModelShape, block_params, block_weight_bytes, fixed_params,
                                    fixed_weight_bytes, kv_bytes_per_token)
from puzzle.profiler.devices import Target
from puzzle.profiler.roofline import block_ms, fixed_ms
from puzzle.profiler.scenario import Scenario
from puzzle.schema import BlockConfig

FIXED_LABEL = "fixed"


def layer_candidates(source: str | Path, *, space: Any = None) -> tuple[Any, list[list[BlockConfig]]]:
    """The parent config and, per layer, every block (attention x FFN variant) the search may pick.

    ``source`` is a block library (its variants) or a model (the default search space, or
    ``space``: a :class:`block_library.space.SearchSpace`); parent blocks come first.
    """
    from block_library.artifact import is_library

    if is_library(source):
        from block_library import open_library
        from block_library.space import parse_variant

        lib = open_library(source)
        config = lib.parent_config
        per_layer = []
        for i in range(config.num_hidden_layers):
            atts = [parse_variant(t, "attention") for t in lib.labels(i, "attention")]
            ffns = [parse_variant(t, "ffn") for t in lib.labels(i, "ffn")]
            per_layer.append(_product(config.blocks[i], atts, ffns))
        return config, per_layer
    from puzzle.loading import load_config

    config = load_config(source)
    return config, space_candidates(config, space=space)


def space_candidates(config: Any, *, space: Any = None) -> list[list[BlockConfig]]:
    """Per layer of a parent config, every block of the search space (default: the default space)."""
    from block_library.space import SearchSpace

    space = space or SearchSpace()
    layers = space.layer_variants(config.blocks, num_attention_heads=config.num_attention_heads)
    out = [_product(config.blocks[lv.layer], lv.attention, lv.ffn) for lv in layers]
    if space.engine is not None:  # pairs the engine cannot load (llama.cpp: a no-op FFN under real attention)
        rules = engine_rules(space.engine)
        out = [[b for k, b in enumerate(blocks) if k == 0 or allowed(
            rules, i, b, parent_kv_heads=config.blocks[i].attention.num_key_value_heads)] for i, blocks in enumerate(out)]
    return out


def _product(parent: BlockConfig, atts: Sequence[Any], ffns: Sequence[Any]) -> list[BlockConfig]:
    blocks = [BlockConfig(attention=a, ffn=f) for a in atts for f in ffns]
    blocks.sort(key=lambda b: b != parent)  # the parent's own block first (stable otherwise)
    return blocks


def block_costs(shape: ModelShape, block: BlockConfig, *, target: Target,
                scenarios: Sequence[Scenario]) -> dict[str, float]:
    """The cost columns of one block on ``target``."""
    row: dict[str, float] = {
        "params": float(block_params(shape, block)),
        "weight_bytes": block_weight_bytes(shape, block, dtype=target.dtype, tp=target.tp),
        "kv_bytes_per_token": kv_bytes_per_token(shape, block, dtype=target.dtype, tp=target.tp),
    }
    for sc in scenarios:
        row[sc.column] = block_ms(shape, block, sc, target)
    return row


def fixed_costs(shape: ModelShape, *, target: Target, scenarios: Sequence[Scenario]) -> dict[str, float]:
    """Embedding, final norm and LM head: what every child pays."""
    row: dict[str, float] = {
        "params": float(fixed_params(shape)),
        "weight_bytes": fixed_weight_bytes(shape, dtype=target.dtype, tp=target.tp),
        "kv_bytes_per_token": 0.0,
    }
    for sc in scenarios:
        row[sc.column] = fixed_ms(shape, sc, target)
    return row


def cost_table(shape: ModelShape, candidates: Sequence[Sequence[BlockConfig]], parent: Sequence[BlockConfig], *,
               target: Target, scenarios: Sequence[Scenario]) -> pd.DataFrame:
    """Rows ``(layer, variant, is_parent, params, weight_bytes, kv_bytes_per_token, <sc>_ms...)``."""
    if len(candidates) != len(parent):
        raise ValueError(f"{len(candidates)} candidate lists for a {len(parent)}-layer parent")
    cache: dict[BlockConfig, dict[str, float]] = {}
    rows = []
    for layer, blocks in enumerate(candidates):
        for b in blocks:
            if b not in cache:
                cache[b] = block_costs(shape, b, target=target, scenarios=scenarios)
            rows.append({"layer": layer, "variant": b.label, "is_parent": b == parent[layer], **cache[b]})
    rows.append({"layer": -1, "variant": FIXED_LABEL, "is_parent": False,
                 **fixed_costs(shape, target=target, scenarios=scenarios)})
    return pd.DataFrame(rows)


def model_totals(table: pd.DataFrame, blocks: Sequence[BlockConfig], scenarios: Sequence[Scenario]) -> dict[str, float]:
    """Step time per scenario, weight and KV bytes of one architecture, summed from the table."""
    keyed = table.set_index(["layer", "variant"])
    rows = [keyed.loc[(i, b.label)] for i, b in enumerate(blocks)] + [keyed.loc[(-1, FIXED_LABEL)]]
    out = {c: float(sum(r[c] for r in rows)) for c in ("params", "weight_bytes", "kv_bytes_per_token")}
    for sc in scenarios:
        out[sc.column] = float(sum(r[sc.column] for r in rows))
    return out
