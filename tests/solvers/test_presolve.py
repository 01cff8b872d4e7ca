"""The dominance presolve drops only candidates that can be swapped for a no-worse one."""

from __future__ import annotations

import pytest

from solvers.backends import BACKENDS, solve
from solvers.model import LinearConstraint, Model, prune_dominated
from tests.solvers.helpers import brute_force, random_problem


def _model(rows, *, objective=(0.5, 0.4, 0.4, 0.9, 0.1), maximize=False):
    # layer 0: candidates 0, 1, 2; layer 1: candidate 3; candidate 4 covers layers 0-1
    return Model(objective=objective, cover=((0, 1, 2, 4), (3, 4)), rows=tuple(rows), maximize=maximize)


def test_dominated_and_duplicate_candidates_are_dropped():
    mem = LinearConstraint("mem", {0: 5.0, 1: 5.0, 2: 5.0, 3: 1.0, 4: 9.0}, "<=", 10.0)
    pruned, kept = prune_dominated(_model([mem]))
    # 0 is worse than 1 (score 0.5 > 0.4, same memory); 2 ties 1 exactly and goes (the earlier stays);
    # 3 and 4 are alone in their groups (4 covers other layers than 0, 1, 2)
    assert kept == (1, 3, 4)
    assert pruned.cover == ((0, 2), (1, 2)) and pruned.objective == (0.4, 0.9, 0.1)
    assert pruned.rows[0].coefs == {0: 5.0, 1: 1.0, 2: 9.0}


def test_a_trade_off_keeps_both_and_senses_are_respected():
    at_least = LinearConstraint("attn", {0: 1.0, 1: 0.0}, ">=", 1.0)  # 0 counts, 1 does not: 0 survives
    assert prune_dominated(_model([at_least]))[1] == (0, 1, 3, 4)
    exactly = LinearConstraint("eq", {0: 1.0, 2: 2.0}, "==", 1.0)  # == rows: only equal coefficients compare
    assert prune_dominated(_model([exactly]))[1] == (0, 1, 2, 3, 4)
    # maximizing, the larger objective is the better one: 0 (0.5) beats 1 and 2 (0.4)
    assert prune_dominated(_model([], maximize=True))[1] == (0, 3, 4)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_without_presolve_the_optimum_is_the_same(backend):
    for seed in range(10):
        problem = random_problem(seed, fused=seed % 2 == 1)
        best = brute_force(problem)[0]
        if best == float("inf"):
            continue
        assert solve(problem, backend, presolve=False).objective == pytest.approx(best, rel=1e-9)
        assert solve(problem, backend, presolve=True).objective == pytest.approx(best, rel=1e-9)
