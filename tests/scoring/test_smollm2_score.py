"""Replace-1-block scores of SmolLM2-135M's trained default library (30 layers x 4 x 8 blocks).

Shares the session's trained library with tests/block_library/test_smollm2_bld.py. Scores 330
replacements on 2 x 64 held-out tokens (a small budget, to keep the suite short: about 2 min on 2 cores).
"""

from __future__ import annotations

import pandas as pd
import pytest

from puzzle.scoring import ScoreConfig, score_library

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_scores(smollm2_trained_library, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_scores") / "scores"
    return score_library(smollm2_trained_library.directory, out, ScoreConfig(seq_len=64, num_sequences=2),
                         progress=False)


def test_every_block_of_every_layer_is_scored_and_the_parent_is_exact(smollm2_scores):
    s = smollm2_scores.scores
    assert s.groupby("layer").variant.nunique().to_dict() == {layer: 4 * 8 for layer in range(30)}
    parent = s[s.is_parent]
    assert len(parent) == 30 and set(parent.variant) == {"gqa:3|swiglu:1536"}
    assert (parent.kl == 0).all() and (parent.loss_delta == 0).all() and (parent.top1_disagreement == 0).all()
    assert (s[~s.is_parent].kl > 0).all()


def test_removing_a_sub_block_costs_more_than_its_best_trained_replacement(smollm2_scores):
    subs = smollm2_scores.subblocks
    trained = subs[~subs.variant.isin(["no_op", "gqa:3", "swiglu:1536"])]  # neither removed nor the parent's
    best = trained.groupby(["layer", "subblock"]).kl.min()
    no_op = subs[subs.variant == "no_op"].set_index(["layer", "subblock"]).kl
    worse = (no_op > best).groupby(level="subblock").mean()
    total = no_op.groupby(level="subblock").sum() / best.groupby(level="subblock").sum()
    matters = no_op >= 0.1  # layers whose sub-block costs at least 0.1 nats to remove
    worse_where_it_matters = (no_op[matters] > best[matters]).groupby(level="subblock").mean()
    # Measured with this fixture (2 BLD steps of 8 x 128 tokens, 2 x 64 scoring tokens): removing the FFN was
    # worse than its best trained replacement on 30 of 30 layers and cost 57x their KL in all. Many attentions
    # barely matter on their own (the Puzzle paper removes most of them): removing one cost less than 0.1 nats
    # on 24 layers, where gqa:1 after two steps is within noise of it (the no-op was worse on 22 of 30 layers in
    # all, 26 of 30 after 2 steps of 8 x 256); on the 6 layers where it costs more, it was worse on all 6, and
    # it cost 2.06x the best replacements' KL in total. At 8 x 256 scoring tokens: see the README.
    detail = (worse.to_dict(), total.to_dict(), pd.DataFrame({"no_op": no_op, "best": best}))
    assert matters.groupby(level="subblock").sum().min() >= 4, detail
    assert (worse_where_it_matters == 1.0).all(), detail
    assert worse["attention"] >= 2 / 3 and worse["ffn"] >= 0.9, detail
    assert total["attention"] >= 1.5 and total["ffn"] >= 10, detail
    assert smollm2_scores.manifest["cost"]["layer_forward_ratio"] > 1.8
