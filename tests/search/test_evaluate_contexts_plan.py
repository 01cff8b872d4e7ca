"""The evaluate stage measures quality at the quality context (the served one by default), at 256 tokens and at twice
the quality context (issue 32), and the plan counts those longer sequences: a rank's peak is the largest context's,
the time is every context's."""

from __future__ import annotations

from block_library.distributed import split_layers
from puzzle.evaluation.contexts import context_chunk
from puzzle.evaluation.memory import evaluate_rank_bytes, layer_params
from puzzle.search import SearchConfig, resolve
from puzzle.search.stages.evaluate import quality_contexts


def _plan(**settings):
    return resolve(SearchConfig(model="smollm2-135m", **settings))


def test_the_quality_context_and_twice_it_and_256_each_with_the_headline_evaluations_tokens():
    plan = _plan()  # quick: 2 x 1024 evaluation tokens at the quality context, decode's 1024 tokens of KV cache
    assert plan.parent_config.max_position_embeddings == 8192 and plan.value("quality_context") == 1024
    assert quality_contexts(plan) == {256: 8, 1024: 2, 2048: 2}
    assert quality_contexts(_plan(preset="full")) == {256: 32, 1024: 8, 2048: 4}
    assert quality_contexts(_plan(context=4096)) == {256: 32, 4096: 2, 8192: 2}
    assert quality_contexts(_plan(context=8192)) == {256: 64, 8192: 2}  # 16384 is past SmolLM2's positions
    assert quality_contexts(_plan(context=16384)) == {256: 64, 8192: 2}  # the quality context stops at 8192
    assert quality_contexts(_plan(scenario="prefill", context=512)) == {256: 4, 512: 2, 1024: 2}
    assert quality_contexts(_plan(quality_context=256)) == {256: 2, 512: 2}  # said: the headline at 256


def test_two_ranks_are_planned_at_the_longest_context():
    plan = _plan(cluster="2xcpu", max_memory_per_rank="8GiB")
    use = plan.resources.stage("evaluate")
    config = plan.parent_config
    ranges = split_layers(layer_params(config), 2)
    for rank, r in enumerate(use.ranks):
        each = {c: evaluate_rank_bytes(config, config, ranges[rank], ranges[rank], first=rank == 0, last=rank == 1,
                                       chunk=context_chunk(c), seq_len=c, num_sequences=n, dtype_bytes=4)
                for c, n in quality_contexts(plan).items()}
        assert r.device_bytes >= max(each.values()) > each[256]
    assert "2 x 2048" in use.how


def test_longer_served_contexts_cost_more_evaluation_time():
    short = _plan(context=256).resources.stage("evaluate")
    long = _plan(context=2048).resources.stage("evaluate")
    assert long.ranks[0].seconds > short.ranks[0].seconds
    assert long.ranks[0].device_bytes > short.ranks[0].device_bytes
