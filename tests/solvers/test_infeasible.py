"""Infeasible budgets raise InfeasibleError that says what is achievable; never an empty result."""

from __future__ import annotations

import pytest

from solvers.backends import BACKENDS, solve
from solvers.diagnose import cover_extreme
from solvers.diverse import diverse_solutions
from solvers.errors import InfeasibleError, ProblemError
from solvers.expressions import attention, count, is_parent
from tests.solvers.helpers import brute_force, covers, random_problem


@pytest.fixture(scope="module")
def plain():
    return random_problem(3, budgets=False)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_memory_alone_reports_the_smallest_achievable_memory(plain, backend):
    smallest = min(plain.totals(c).memory_bytes for c in covers(plain))
    assert smallest == 6976.0  # 1000 fixed weight bytes + the lightest layers, computed by enumeration
    with pytest.raises(InfeasibleError) as e:
        solve(plain.with_budget(memory_bytes=5000), backend)
    assert str(e.value) == ("infeasible: memory <= 4.883 KiB: the smallest achievable memory is 6.812 KiB")
    d = e.value.diagnosis["memory <= 4.883 KiB"]
    assert d == {"sense": "<=", "requested": 5000.0, "best": 6976.0, "alone": True, "given_others": False}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_throughput_alone_reports_the_best_achievable_throughput(plain, backend):
    best = max(plain.totals(c).throughput for c in covers(plain))
    with pytest.raises(InfeasibleError) as e:
        solve(plain.with_budget(throughput=2000.0, memory_bytes=1e9), backend)
    assert str(e.value) == (f"infeasible: throughput >= 2000 tokens/s: the largest achievable throughput is "
                            f"{best:.6g} tokens/s")
    assert f"{best:.6g}" == "1448.05"
    assert e.value.diagnosis["throughput >= 2000 tokens/s"]["best"] == pytest.approx(best)
    assert e.value.diagnosis["memory <= 953.674 MiB"]["alone"] is False


def test_speedup_and_params_alone(plain):
    parent_step = plain.totals(plain.parent).step_ms
    best_speedup = max(parent_step / plain.totals(c).step_ms for c in covers(plain))
    message = rf"speedup >= 9.0000x: the largest achievable speedup is {best_speedup:.4f}x"
    with pytest.raises(InfeasibleError, match=message):
        solve(plain.with_budget(speedup=9.0))
    fewest = min(plain.totals(c).params for c in covers(plain))
    assert fewest == 1757  # 500 fixed + the smallest layers
    with pytest.raises(InfeasibleError) as e:
        solve(plain.with_budget(max_params=10))
    assert str(e.value) == "infeasible: params <= 10: the smallest achievable parameter count is 1757"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_jointly_infeasible_reports_the_best_of_each_given_the_others(plain, backend):
    parent = plain.totals(plain.parent)
    problem = plain.with_budget(throughput=1.5 * parent.throughput).with_constraints(count(is_parent) >= 4)
    assert brute_force(problem)[1] is None
    with pytest.raises(InfeasibleError) as e:
        solve(problem, backend)
    msg = str(e.value)
    # by enumeration: with 4 parent layers kept, the best throughput; at the target, the most parent layers
    target = 1.5 * parent.throughput
    all_covers = list(covers(plain))
    best_throughput = max(plain.totals(c).throughput for c in all_covers
                          if sum(plain.candidates[i].is_parent for i in c) >= 4)
    most_parents = max(sum(plain.candidates[i].is_parent for i in c) for c in all_covers
                       if plain.totals(c).throughput >= target)
    assert (f"{target:.6g}", f"{best_throughput:.6g}", most_parents) == ("918.619", "807.487", 3)
    assert msg == ("infeasible: each constraint can be met alone, but not all together; given the other constraints, "
                   "throughput >= 918.619 tokens/s: the largest achievable throughput is 807.487 tokens/s; "
                   "count(is_parent) >= 4: the largest achievable count(is_parent) is 3")
    assert e.value.diagnosis["count(is_parent) >= 4"] == {
        "sense": ">=", "requested": 4.0, "best": 3.0, "alone": False, "given_others": True}


def test_equality_reports_the_closest_achievable(plain):
    with pytest.raises(InfeasibleError, match=r"count\(attention == no_op\) == 7: the closest achievable .* is 6"):
        solve(plain.with_constraints(count(attention == "no_op") == 7))


def test_diverse_never_returns_empty(plain):
    with pytest.raises(InfeasibleError):
        diverse_solutions(plain.with_budget(memory_bytes=5000), 3)


def test_cover_extreme_is_the_enumerated_extreme(plain):
    lat = dict(enumerate(plain.column("decode_ms")))
    enum = [sum(lat[i] for i in c) for c in covers(plain)]
    assert cover_extreme(plain, lat) == pytest.approx(min(enum))
    assert cover_extreme(plain, lat, maximize=True) == pytest.approx(max(enum))


def test_a_layer_without_candidates_is_a_problem_error_not_infeasible(plain):
    cands = [c for c in plain.candidates if c.layers != (2,)]
    with pytest.raises(ProblemError, match=r"layers \[2\] have no candidate"):
        plain.replace(candidates=tuple(cands))
