"""Fused segments as span candidates: the MIP picks fusion exactly when the budget needs it."""

from __future__ import annotations

import pandas as pd
import pytest

from puzzle.errors import ConfigError
from puzzle.fusion.candidates import add_fused_candidates
from puzzle.fusion.runs import Segment, fused_blocks
from puzzle.profiler.counts import ModelShape
from puzzle.profiler.hardware import parse_target
from puzzle.profiler.roofline import model_ms
from puzzle.profiler.scenario import parse_scenario
from puzzle.profiler.table import cost_table
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig
from solvers import Budget, solve
from solvers.io import problem_from_tables

SHAPE = ModelShape(576, 9, 64, 49152)
PARENT = BlockConfig(attention=AttentionConfig.gqa(3), ffn=FFNConfig.swiglu(1536))
NO_ATTN = BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(1536))
DECODE = parse_scenario("decode:batch=8,context=1024")


def _tables(target):
    parent = [PARENT] * 6
    candidates = [[PARENT, NO_ATTN]] * 6
    costs = cost_table(SHAPE, candidates, parent, target=target, scenarios=[DECODE])
    scores = costs[costs.layer >= 0][["layer", "variant"]].copy()
    scores["kl"] = [0.0 if v == PARENT.label else 0.01 for v in scores.variant]
    child = [PARENT, PARENT, NO_ATTN, NO_ATTN, NO_ATTN, PARENT]
    return scores, costs, child


def test_fused_candidate_costs_are_the_fused_block_and_the_mip_takes_it_when_needed():
    target = parse_target("8xH100")
    scores, costs, child = _tables(target)
    seg = Segment(2, 5)
    s2, c2 = add_fused_candidates(scores, costs, [(seg, 0.05)], blocks=child, shape=SHAPE, target=target,
                                  scenarios=[DECODE])
    row = c2[(c2.layer == 2) & (c2.span == 3)].iloc[0]
    assert row.variant == "+".join([NO_ATTN.label] * 3)
    fused_arch, _ = fused_blocks(child, [seg])
    # The table's fused row prices exactly what the profiler predicts for the fused architecture.
    saved = model_ms(SHAPE, child, DECODE, target) - model_ms(SHAPE, fused_arch, DECODE, target)
    assert 3 * c2[(c2.layer == 2) & (c2.span == 1) & (c2.variant == NO_ATTN.label)].decode_ms.iloc[0] - row.decode_ms \
        == pytest.approx(saved)
    assert s2[(s2.layer == 2) & (s2.span == 3)].kl.iloc[0] == pytest.approx(0.03 + 0.05)

    def best(speedup):
        p = problem_from_tables(s2, c2, score_column="kl", scenario=DECODE,
                                budget=Budget(speedup=speedup))
        return solve(p)

    # Removing all six attentions separately is the fastest unfused child; ask for more than that.
    all_removed = [NO_ATTN] * 6
    unfused_best = model_ms(SHAPE, [PARENT] * 6, DECODE, target) / model_ms(SHAPE, all_removed, DECODE, target)
    sol = best(unfused_best * 1.005)
    assert any(len(c.layers) == 3 for c in sol.candidates)
    # A budget the unfused children meet: fusion costs KL, so it is not taken.
    sol = best(1.05)
    assert all(len(c.layers) == 1 for c in sol.candidates)


def test_members_must_be_candidates_and_fusable():
    target = parse_target("8xH100")
    scores, costs, child = _tables(target)
    with pytest.raises(ConfigError, match="not attention-free"):
        add_fused_candidates(scores, costs, [(Segment(1, 3), 0.0)], blocks=child, shape=SHAPE, target=target,
                             scenarios=[DECODE])
    wide = list(child)
    wide[3] = BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(1024))
    with pytest.raises(ConfigError, match="not candidates"):
        add_fused_candidates(scores, costs, [(Segment(2, 5), 0.0)], blocks=wide, shape=SHAPE, target=target,
                             scenarios=[DECODE])
    assert isinstance(scores, pd.DataFrame)
