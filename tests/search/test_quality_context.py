"""The quality context (issue 32): scoring, the finalists, child-aware BLD, GKD and the evaluation's headline read
sequences of the budget scenario's length, the plan counts them, and a run at 256 tokens keeps its old keys."""

from __future__ import annotations

import pytest

from puzzle.errors import ConfigError
from puzzle.search import SearchConfig, resolve


def _plan(**settings):
    return resolve(SearchConfig(model="smollm2-135m", **settings))


def test_the_quality_context_is_the_budgets_length_within_the_parents_positions():
    plan = _plan()
    assert (plan.value("context"), plan.value("quality_context"), plan.value("score_seq_len")) == (1024, 1024, 1024)
    assert plan.settings["quality_context"].source == "derived"
    assert _plan(context=4096).value("quality_context") == 4096
    assert _plan(scenario="prefill", context=512).value("quality_context") == 512  # the prompt
    assert _plan(context=20000).value("quality_context") == 8192  # SmolLM2's max_position_embeddings
    said = _plan(quality_context=512, score_seq_len=256)
    assert (said.value("quality_context"), said.value("score_seq_len")) == (512, 256)
    with pytest.raises(ConfigError, match=r"^--quality-context 9000 is longer than the parent's "
                                          r"max_position_embeddings \(8192\): use at most 8192$"):
        _plan(quality_context=9000)
    with pytest.raises(ConfigError, match=r"^--score-seq-len 10000 is longer"):
        _plan(score_seq_len=10000)
    with pytest.raises(ConfigError, match="quality_context"):
        _plan(quality_context=1)


def test_child_aware_bld_keeps_its_tokens_a_step_in_sequences_of_the_quality_context():
    from puzzle.search.stages.child_bld import ChildBLDSettings, training_config

    long, short = (training_config(ChildBLDSettings.of(_plan(quality_context=c))) for c in (1024, 256))
    assert (long.seq_len, long.step_batch, long.steps) == (1024, 1, 16)  # quick: 16,384 tokens
    assert (short.seq_len, short.step_batch, short.steps) == (256, 4, 16)
    assert long.step_batch * long.seq_len == short.step_batch * short.seq_len == 1024


def test_child_aware_bld_reads_after_every_library_token_at_any_length():
    """The library reads bld_eval_sequences x 256 + bld_tokens train tokens (quick: 16 x 256 + 4,096 = 8,192): child
    -aware BLD skips as many sequences of its own length as cover them."""
    from puzzle.loading import load_tokenizer
    from puzzle.search.stages.child_bld import ChildBLDSettings, training_config, training_ids

    tok = load_tokenizer("smollm2-135m")
    plan = _plan(quality_context=1024, child_bld_tokens=1024)
    cfg = training_config(ChildBLDSettings.of(plan))
    ids = training_ids(plan, tok, cfg)  # (1, 1024)
    from puzzle.data import load_sequences

    stream = load_sequences(["stdlib"], tok, seq_len=1024, num_sequences=9)  # the library's 8,192 tokens, then ours
    assert ids.shape == (1, 1024) and ids.equal(stream[8:9])


def test_finalists_read_their_tokens_at_the_quality_context_after_the_evaluations():
    from puzzle.search.finalists import finalist_reads
    from puzzle.search.stages.solve import finalist_plan

    assert finalist_reads(4096, 1024) == (4, 2) and finalist_reads(4096, 256) == (16, 4)  # 4,096 tokens skipped
    assert finalist_reads(40960, 1024) == (40, 2)  # a long evaluation is skipped whole
    assert finalist_plan(_plan()) == (4, 2, 1024)  # quick: the evaluation's longest context, 2 x 2048, skipped
    assert finalist_plan(_plan(preset="full")) == (8, 2, 1024)  # 8 x 1024 evaluated


def test_gkd_trains_on_sequences_of_the_quality_context_and_keys_say_so():
    from puzzle.search.stages.gkd import STAGE, training_key

    plan = _plan()
    cfg = STAGE.config(plan)
    assert (cfg.seq_len, cfg.batch) == (1024, 1)
    assert training_key(plan)["seq_len"] == 1024 and "seq_len" not in training_key(_plan(quality_context=256))
    from puzzle.search.stages import child_bld

    assert child_bld.training_key(plan)["seq_len"] == 1024


@pytest.mark.parametrize("stage", ["score", "solve", "child_bld", "gkd", "evaluate"])
def test_the_plan_counts_the_longer_sequences(stage):
    """Activations and attention scores grow with the context: each quality stage's planned peak and time grow
    with the quality context, at the same tokens."""
    short = _plan(quality_context=256, score_sequences=8, gkd_batch=4, eval_sequences=8).resources.stage(stage)
    long = _plan(quality_context=2048, score_sequences=1, gkd_batch=1, eval_sequences=1).resources.stage(stage)
    assert long.ranks[0].seconds > short.ranks[0].seconds
    assert long.peak_device_bytes > short.peak_device_bytes
    assert "2048" in long.how  # the plan says which tokens each reads
