"""Several different solutions, and frontiers over a grid of targets."""

from __future__ import annotations

import math

import pytest

from solvers.backends import BACKENDS
from solvers.constraints import Differs
from solvers.diverse import diverse_solutions
from solvers.frontier import default_targets, frontier
from tests.solvers.helpers import brute_force, covers, random_problem


def _differing_layers(a, b) -> int:
    return sum(x != y for x, y in zip(a.layer_labels(), b.layer_labels(), strict=True))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_k_diverse_solutions_differ_by_the_fraction_asked(backend):
    base = random_problem(11, budgets=False)
    problem = base.with_budget(throughput=1.3 * base.totals(base.parent).throughput)
    sols = diverse_solutions(problem, 4, min_fraction=0.5, backend=backend)  # >= 3 of 6 layers each
    assert len(sols) == 4
    assert sols[0].objective == pytest.approx(brute_force(problem)[0])
    for k, s in enumerate(sols):
        for earlier in sols[:k]:
            assert _differing_layers(s, earlier) >= 3
    objectives = [s.objective for s in sols]
    assert objectives == sorted(objectives)  # each is the best of what is left
    # the second is the brute-force best among choices that differ from the first in >= 3 layers
    second = problem.with_constraints(Differs(sols[0].chosen, 3))
    assert sols[1].objective == pytest.approx(brute_force(second)[0])
    assert [c.name for c in sols[2].checks][-2:] == ["differs from solution 1 in >= 3 layers",
                                                     "differs from solution 2 in >= 3 layers"]


def test_diverse_stops_when_nothing_different_is_left():
    base = random_problem(11, budgets=False)
    sols = diverse_solutions(base, 50, min_fraction=1.0)  # every layer must change each time: 4 variants per layer
    assert len(sols) == 4
    for a in range(4):
        for b in range(a):
            assert _differing_layers(sols[a], sols[b]) == 6


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_frontier_is_monotone_and_matches_brute_force(backend):
    base = random_problem(12, budgets=False)
    parent = base.totals(base.parent).throughput
    best = max(base.totals(c).throughput for c in covers(base))
    targets = [parent * f for f in (0.9, 1.1, 1.3, 1.5, 1.7, 1.9)] + [best * 1.01]
    table = frontier(base, axis="throughput", targets=targets, backend=backend)
    assert list(table.columns[:8]) == ["target", "status", "objective", "throughput", "speedup", "step_ms",
                                       "memory_gib", "params"]
    feasible = table[table["status"] == "optimal"]
    assert len(feasible) == 6 and table["status"].iloc[-1] == "infeasible"
    assert "largest achievable throughput" in table["reason"].iloc[-1]
    assert feasible["objective"].is_monotonic_increasing
    assert (feasible["throughput"] >= feasible["target"] * (1 - 1e-9)).all()
    for target, objective in zip(feasible["target"], feasible["objective"], strict=True):
        assert objective == pytest.approx(brute_force(base.with_budget(throughput=target))[0])
    assert feasible["objective"].iloc[0] == 0.0  # below the parent's throughput the parent is optimal


def test_default_targets_span_from_the_free_optimum_to_the_best():
    base = random_problem(12, budgets=False)
    t = default_targets(base, "throughput", points=5)
    assert t[0] == pytest.approx(base.totals(base.parent).throughput)  # the free optimum is the parent
    assert t[-1] == pytest.approx(max(base.totals(c).throughput for c in covers(base)))
    table = frontier(base, axis="memory", points=4)
    assert table["status"].eq("optimal").all()
    assert table["objective"].is_monotonic_decreasing  # more memory, less loss
    assert table["target"].iloc[-1] == pytest.approx(base.totals(base.parent).memory_bytes)
    assert not math.isnan(table["memory_gib"].iloc[0])
