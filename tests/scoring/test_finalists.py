"""Finalists: the MIP's best different solutions, assembled and measured; the lowest measured KL first."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from block_library import open_library
from puzzle.evaluation.quality import evaluate_quality
from puzzle.loading import load_model, load_tokenizer
from puzzle.schema import blocks_from_list
from puzzle.search.finalists import finalist_ids, measure_finalists, score_fidelity
from solvers import Budget
from solvers.diverse import diverse_solutions
from solvers.io import problem_from_tables

pytestmark = pytest.mark.slow  # the tiny library's build (shared with the other scoring tests)


def _costs(lib) -> pd.DataFrame:  # noqa: ANN001
    """Per layer and block label, the block's parameters; the fixed row holds the embedding and head."""
    t = lib.table
    rows = []
    for layer in sorted(t.layer.unique()):
        sub = t[t.layer == layer]
        for _, a in sub[sub.subblock == "attention"].iterrows():
            for _, f in sub[sub.subblock == "ffn"].iterrows():
                rows.append({"layer": layer, "variant": f"{a.variant}|{f.variant}", "params": a.params + f.params})
    rows.append({"layer": -1, "variant": "fixed", "params": 1000.0})
    return pd.DataFrame(rows)


def budget_problem(scored, lib, fraction: float):  # noqa: ANN001, ANN201
    """The MIP over the tiny library's scores with ``fraction`` of the parent's decoder parameters."""
    costs = _costs(lib)
    parent_params = costs.merge(scored.scores[scored.scores.is_parent][["layer", "variant"]]).params
    budget = Budget(max_params=1000.0 + fraction * parent_params.sum())
    return problem_from_tables(scored.scores, costs, score_column="kl", budget=budget), budget


def test_finalists_are_measured_children_best_first(scored_additive, tiny_library, tiny_text_parent):
    lib = open_library(tiny_library)
    parent, tok = load_model(str(tiny_text_parent)), load_tokenizer(str(tiny_text_parent))
    problem, budget = budget_problem(scored_additive, lib, 0.7)
    ids = finalist_ids(["stdlib"], tok, skip=2, sequences=2)
    sols = diverse_solutions(problem, 4, min_fraction=0.3)
    assert len(sols) == 4 and len({tuple(s.layer_labels()) for s in sols}) == 4
    fin = measure_finalists(lib, parent, sols, ids)
    assert sorted(f.mip_rank for f in fin) == [0, 1, 2, 3]
    assert [f.kl for f in fin] == sorted(f.kl for f in fin) and fin[0].kl > 0
    for f in fin:  # each measurement is the assembled child's KL on those tokens
        child = lib.assemble(blocks_from_list(f.solution.block_configs()))
        assert f.kl == pytest.approx(evaluate_quality(child, ids, parent=parent)["kl"], rel=1e-5)
        assert f.solution.totals.params <= budget.max_params
    rho = score_fidelity(fin)
    assert rho is not None and -1.0 <= rho <= 1.0
    assert score_fidelity(fin[:2]) is None


def test_finalist_tokens_come_after_the_evaluations(tiny_text_parent):
    from puzzle.data.packing import load_sequences

    tok = load_tokenizer(str(tiny_text_parent))
    first = load_sequences(["stdlib"], tok, seq_len=256, num_sequences=5, split="validation")
    ids = finalist_ids(["stdlib"], tok, skip=3, sequences=2)
    assert ids.shape == (2, 256) and torch.equal(ids, first[3:])


def test_the_parent_itself_measures_zero(scored_additive, tiny_library, tiny_text_parent):
    lib = open_library(tiny_library)
    parent, tok = load_model(str(tiny_text_parent)), load_tokenizer(str(tiny_text_parent))
    problem = problem_from_tables(scored_additive.scores, _costs(lib), score_column="kl")  # no budget: the parent
    fin = measure_finalists(lib, parent, diverse_solutions(problem, 2), finalist_ids(["stdlib"], tok, skip=0,
                                                                                     sequences=1))
    assert fin[0].mip_rank == 0 and fin[0].kl == pytest.approx(0.0, abs=1e-6) and fin[1].kl > 1e-4


def test_score_fidelity_is_spearmans_rank_correlation():
    from types import SimpleNamespace

    from puzzle.search.finalists import Finalist

    def finalists(predicted, measured):  # noqa: ANN001, ANN202
        sols = [SimpleNamespace(objective=p, totals=SimpleNamespace(params=0.0, speedup=1.0), layer_labels=list)
                for p in predicted]
        return [Finalist(mip_rank=k, solution=s, quality={"kl": m, "top1_agreement": 1.0})
                for k, (s, m) in enumerate(zip(sols, measured))]

    assert score_fidelity(finalists([1, 2, 3, 4], [10, 20, 30, 40])) == pytest.approx(1.0)
    assert score_fidelity(finalists([1, 2, 3, 4], [40, 30, 20, 10])) == pytest.approx(-1.0)
    assert score_fidelity(finalists([1, 2, 3, 4], [10, 30, 20, 40])) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert score_fidelity(finalists([1, 1, 1], [1, 2, 3])) is None  # the MIP could not tell them apart at all
