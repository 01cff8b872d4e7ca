"""What-if searches by shape: Llama-3.1 specs, the search space, proxy scores, fusion of whole runs."""

from __future__ import annotations

import pytest

from puzzle.profiler.hardware import parse_target
from puzzle.profiler.scenario import Scenario
from puzzle.search.whatif import (LLAMA_31, SCORE, evaluate, drop_identity, fuse_all_runs, fusion_segments, layer_importance,
                                  memory_per_device, proxy_scores, search_space, whatif_problem)
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig, blocks_from_list
from solvers import InfeasibleError, solve

DECODE = Scenario(name="decode", phase="decode", batch=64, length=4096)
PREFILL = Scenario(name="prefill", phase="prefill", batch=1, length=4096)


@pytest.mark.parametrize(("key", "billions"), [("8B", 8.03), ("70B", 70.55), ("405B", 405.85)])
def test_parent_sizes_are_the_published_ones(key, billions):
    spec = LLAMA_31[key]
    params_b = evaluate(spec, spec.blocks(), parse_target("1xH100"), decode=DECODE, prefill=PREFILL)["params_b"]
    assert params_b == pytest.approx(billions, abs=0.01)


def test_search_space_has_42_blocks_parent_first():
    spec = LLAMA_31["70B"]
    space = search_space(spec)
    assert len(space) == len(set(space)) == 6 * 7
    assert space[0] == spec.parent_block()
    widths = {b.ffn.intermediate_size for b in space if b.ffn.kind == "swiglu"}
    assert widths == {28672, 21504, 14336, 7168, 2816}  # 100 / 75 / 50 / 25 / ~10%, multiples of 256
    assert {b.attention.label for b in space} == {"gqa:8", "gqa:4", "gqa:2", "gqa:1", "linear", "no_op"}


def test_proxy_scores_are_normalized_param_shares():
    spec = LLAMA_31["8B"]
    space = search_space(spec)
    scores = proxy_scores(spec, [space] * spec.num_layers)
    assert (scores[SCORE] >= 0).all()
    assert scores[scores.variant == space[0].label][SCORE].max() == 0.0  # the parent's own block is free
    assert scores[scores.variant == "no_op|no_op"][SCORE].sum() == pytest.approx(1.0)  # removing everything
    # U-shaped in depth, the first layer the most important
    n = spec.num_layers
    assert layer_importance(0, n) > layer_importance(n - 1, n) > layer_importance(n // 2, n)


def test_fusion_cuts_runs_by_width_only():
    gqa = BlockConfig(attention=AttentionConfig.gqa(8), ffn=FFNConfig.swiglu(1024))
    free = BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(1024))
    blocks = [gqa, free, free, free, free, free, gqa, free]  # one run of 5 (layers 1-5); layer 7 alone
    assert [s.label for s in fusion_segments(blocks, max_width=None)] == ["1-5"]
    segments = fusion_segments(blocks, max_width=2048)  # 5 layers of width 1024: two pairs and one alone
    assert [len(s) for s in segments] == [2, 2] and all(1 <= s.start and s.stop <= 6 for s in segments)
    fused = fuse_all_runs(blocks, max_width=2048)
    assert len(fused) == 6
    assert sorted(b.ffn.intermediate_size for b in fused) == [1024, 1024, 1024, 1024, 2048, 2048]


def test_identity_layers_do_not_split_runs():
    free = BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(1024))
    gone = BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.no_op())
    fused = fuse_all_runs([free, gone, free, gone], max_width=None)
    assert fused == [BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(2048))]


def test_fused_child_is_never_slower_and_meets_the_target():
    spec, target = LLAMA_31["8B"], parse_target("8xH100")
    _, problem = whatif_problem(spec, target, decode=DECODE, prefill=PREFILL, speedup=3.0,
                                memory_bytes=72e9, max_loss=0.5)
    sol = solve(problem, "cpsat", explain=False)
    child = blocks_from_list(sol.block_configs())
    fused = fuse_all_runs(child, max_width=8 * spec.intermediate_size)
    parent = evaluate(spec, spec.blocks(), target, decode=DECODE, prefill=PREFILL)
    before = evaluate(spec, child, target, decode=DECODE, prefill=PREFILL)
    after = evaluate(spec, fused, target, decode=DECODE, prefill=PREFILL)
    assert parent["decode_ms"] / before["decode_ms"] >= 3.0 - 1e-6
    assert before["decode_ms"] == pytest.approx(sol.totals.step_ms)  # the table and model_ms agree
    assert before["memory_gb"] * 1e9 == pytest.approx(sol.totals.memory_bytes)
    assert len(fused) < len(drop_identity(child))  # at 3x on 8 GPUs the MIP drops attention in consecutive layers
    assert after["decode_ms"] < before["decode_ms"] and after["prefill_ms"] <= before["prefill_ms"]
    assert after["params_b"] == pytest.approx(before["params_b"], rel=1e-4)  # fusion only drops norms


def test_405b_bf16_does_not_fit_one_h100_and_the_search_says_so():
    spec, target = LLAMA_31["405B"], parse_target("1xH100")
    assert memory_per_device(spec, spec.blocks(), target, DECODE) > 10 * target.accelerator.memory_bytes
    _, problem = whatif_problem(spec, target, decode=DECODE, prefill=PREFILL, speedup=1.5,
                                memory_bytes=0.9 * target.accelerator.memory_bytes, max_loss=0.5)
    with pytest.raises(InfeasibleError):
        solve(problem, "cpsat", explain=False)
