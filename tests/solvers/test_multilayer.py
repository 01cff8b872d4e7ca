"""Candidates that cover several consecutive layers (fused FFN runs): each layer is covered once."""

from __future__ import annotations

import dataclasses

import pytest

from solvers.backends import BACKENDS, solve
from solvers.errors import ProblemError
from solvers.expressions import attention, count, layer
from solvers.problem import Candidate
from tests.solvers.helpers import FUSED, brute_force, random_problem


def _with_cheap_fusion(seed: int):
    """A problem whose fused runs are fast and almost free of loss, so the optimum uses them."""
    base = random_problem(seed, fused=True, budgets=False)
    cands = [dataclasses.replace(c, scores={**c.scores, "kl": 0.001}) if len(c.layers) > 1 else c
             for c in base.candidates]
    problem = base.replace(candidates=tuple(cands))
    return problem.with_budget(throughput=1.6 * problem.totals(problem.parent).throughput)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_layer_is_covered_exactly_once(backend):
    used = 0
    for seed in range(100, 110):
        problem = _with_cheap_fusion(seed)
        sol = solve(problem, backend)
        layers = [layer for c in sol.candidates for layer in c.layers]
        assert sorted(layers) == list(range(problem.num_layers))  # no gap, no overlap
        assert sol.objective == pytest.approx(brute_force(problem)[0], rel=1e-9)
        used += any(len(c.layers) == 2 for c in sol.candidates)
    assert used >= 5  # the fused runs are really chosen


def test_solution_records_fused_runs_and_one_block_config_per_layer():
    problem = _with_cheap_fusion(101)
    sol = solve(problem)
    data = sol.to_dict()
    fused = [c for c in sol.candidates if len(c.layers) == 2]
    assert data["fused"] == [{"id": c.id, "layers": list(c.layers), "variants": [FUSED, FUSED]} for c in fused]
    assert len(data["block_configs"]) == 6 and list(data["chosen"]) == [str(i) for i in range(6)]
    for c in fused:
        for i in c.layers:
            assert data["chosen"][str(i)] == FUSED
            assert data["block_configs"][i] == {"attention": {"kind": "no_op"},
                                                "ffn": {"kind": "swiglu", "intermediate_size": 2048}}


def test_count_counts_layers_of_a_fused_run():
    problem = _with_cheap_fusion(101)
    fused = next(i for i, c in enumerate(problem.candidates) if len(c.layers) == 2)
    coefs, _ = count(attention == "no_op").terms[0][1].coefs(problem)
    assert coefs[fused] == 2.0
    row = (layer[fused and problem.candidates[fused].layers[1]] == "no_op|swiglu:2048").compile(problem)
    assert row.coefs[fused] == 1.0  # a fused run answers for each layer it covers


def test_multi_layer_candidates_must_be_consecutive():
    with pytest.raises(ProblemError, match="layers must be consecutive"):
        Candidate(id="x", layers=(1, 3), members=(FUSED, FUSED))
    with pytest.raises(ProblemError, match="2 layers but 1 member labels"):
        Candidate(id="x", layers=(1, 2), members=(FUSED,))
