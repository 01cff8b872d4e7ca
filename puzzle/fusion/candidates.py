"""Fused segments as multi-layer MIP candidates: rows for the scores and costs tables.

A fused segment covers layers ``start .. stop - 1`` with one wide block. In the search's tables
(format in :mod:`solvers.io`) it is one candidate with ``span = len(segment)`` and the members'
labels joined by ``+``; its costs are the fused block's (one sequential step, one all-reduce under
tensor parallelism) and its score is the sum of its members' scores plus the measured price of
fusing them (the KL of the fused model to the unfused one, from the fusion report). The MIP then
trades "these layers separately" against "these layers fused" under the same budgets:

    scores, costs = add_fused_candidates(scores, costs, [(Segment(5, 8), 0.078)], blocks=child_blocks,
                                         shape=shape, target=target, scenarios=scenarios)
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from puzzle.errors import ConfigError
from puzzle.fusion.runs import Segment, check_segments, fused_blocks
from puzzle.profiler.counts import ModelShape
from puzzle.profiler.hardware import Target
from puzzle.profiler.scenario import Scenario
from puzzle.profiler.table import block_costs
from puzzle.schema import BlockConfig


def add_fused_candidates(scores: pd.DataFrame, costs: pd.DataFrame, fused: Sequence[tuple[Segment, float]], *,
                         blocks: Sequence[BlockConfig], shape: ModelShape, target: Target,
                         scenarios: Sequence[Scenario], score_column: str = "kl") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two tables with one span row per ``(segment, fusion_penalty)`` of the architecture ``blocks``.

    Every member block must already be a single-layer candidate of its layer in ``scores``; the
    penalty is in ``score_column``'s units. Other score columns of the new rows are left empty.
    """
    check_segments(blocks, [s for s, _ in fused])
    keyed = scores.assign(span=scores.get("span", 1)).set_index(["layer", "span", "variant"])
    new_scores, new_costs = [], []
    for seg, penalty in fused:
        if len(seg) < 2:
            raise ConfigError(f"segment {seg.label}: a fused candidate covers two or more layers")
        members = [blocks[i].label for i in seg.layers]
        missing = [f"{i}:{m}" for i, m in zip(seg.layers, members) if (i, 1, m) not in keyed.index]
        if missing:
            raise ConfigError(f"segment {seg.label}: members {missing} are not candidates in the scores table")
        member_score = sum(float(keyed.loc[(i, 1, m), score_column]) for i, m in zip(seg.layers, members))
        variant = "+".join(members)
        new_scores.append({"layer": seg.start, "span": len(seg), "variant": variant,
                           score_column: member_score + float(penalty)})
        wide = fused_blocks(blocks, [seg])[0][seg.start]
        new_costs.append({"layer": seg.start, "span": len(seg), "variant": variant, "is_parent": False,
                          **block_costs(shape, wide, target=target, scenarios=scenarios)})
    out_scores = pd.concat([scores.assign(span=scores.get("span", 1)), pd.DataFrame(new_scores)], ignore_index=True)
    out_costs = pd.concat([costs.assign(span=costs.get("span", 1)), pd.DataFrame(new_costs)], ignore_index=True)
    return out_scores, out_costs
