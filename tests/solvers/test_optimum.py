"""Every backend finds the brute-force optimum of random small problems, custom constraints included."""

from __future__ import annotations

import math

import pytest

from solvers.backends import BACKENDS, solve
from solvers.errors import InfeasibleError, ProblemError
from solvers.expressions import attention, count, layer, total
from solvers.parse import parse_constraint
from tests.solvers.helpers import brute_force, random_problem

SEEDS = range(30)


def _assert_matches_brute_force(problem, backend: str) -> None:
    best, _ = brute_force(problem)
    if math.isinf(best):
        with pytest.raises(InfeasibleError):
            solve(problem, backend)
        return
    sol = solve(problem, backend)
    assert sol.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert sol.status == "optimal" and sol.gap == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_same_optimum_as_brute_force_6_layers_x_4_variants(backend):
    feasible = 0
    for seed in SEEDS:
        problem = random_problem(seed)
        assert len(problem.candidates) == 24
        _assert_matches_brute_force(problem, backend)
        feasible += not math.isinf(brute_force(problem)[0])
    assert feasible >= 15  # the random budgets are mostly feasible, and some are not


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_same_optimum_with_two_layer_candidates(backend):
    for seed in range(15):
        problem = random_problem(100 + seed, fused=True)
        assert any(len(c.layers) == 2 for c in problem.candidates)
        _assert_matches_brute_force(problem, backend)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_speedup_latency_and_params_budgets(backend):
    for seed in range(8):
        base = random_problem(200 + seed, budgets=False)
        parent = base.totals(base.parent)
        for budget in ({"speedup": 1.6}, {"latency_ms": 0.7 * parent.step_ms}, {"max_params": 0.6 * parent.params},
                       {"speedup": 1.3, "max_params": 0.8 * parent.params}):
            _assert_matches_brute_force(base.with_budget(**budget), backend)


def _count_away_from(expr, value: int, top: int):
    """A bound on ``expr`` that ``value`` violates: ``>= value + 1`` unless ``value`` is already ``top``."""
    return expr >= value + 1 if value < top else expr <= value - 1


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_custom_constraints_bind(backend):
    """Each constraint excludes the optimum without it; the new optimum is the brute-force one."""
    feasible = 0
    for seed in range(6):
        plain = random_problem(300 + seed, budgets=False)
        base = plain.with_budget(throughput=1.4 * plain.totals(plain.parent).throughput)
        free = solve(base, backend)
        labels = free.layer_labels()
        with_attention = sum(not lab.startswith("no_op") for lab in labels)
        some_no_op = sum("no_op" in lab for lab in labels)
        not_parent = next(i for i, lab in enumerate(labels) if lab != "gqa:8|swiglu:1024")
        constraints = [
            _count_away_from(count(attention != "no_op"), with_attention, len(labels)),
            layer[not_parent] == "parent",
            total("params") <= free.totals.params - 1,
            parse_constraint(f"count(attention == no_op or ffn == no_op) {'<=' if some_no_op else '>='} "
                             f"{some_no_op - 1 if some_no_op else 1}"),
        ]
        constraints += [layer[i].ffn == "swiglu:1024" for i, lab in enumerate(labels) if "swiglu:1024" not in lab][:1]
        for constraint in constraints:
            problem = base.with_constraints(constraint)
            best, _ = brute_force(problem)
            if math.isinf(best):
                with pytest.raises(InfeasibleError):
                    solve(problem, backend)
                continue
            feasible += 1
            assert best > free.objective + 1e-12, constraint.name  # it binds
            sol = solve(problem, backend)
            assert sol.objective == pytest.approx(best, rel=1e-9), constraint.name
            (check,) = [c for c in sol.checks if c.name == constraint.name]
            assert check.ok
    assert feasible >= 20  # of 30


def test_layer_equals_parent_pins_the_parent_block():
    base = random_problem(7, budgets=False)
    problem = base.with_constraints(*(layer[i] == "parent" for i in range(3)), layer[5] != "parent")
    sol = solve(problem)
    assert sol.layer_labels()[:3] == ["gqa:8|swiglu:1024"] * 3
    assert sol.layer_labels()[5] != "gqa:8|swiglu:1024"
    assert sol.objective == pytest.approx(brute_force(problem)[0])


def test_cpsat_refuses_a_non_integer_equality_but_the_others_solve_it():
    problem = random_problem(1, budgets=False).with_constraints(total("decode_ms") == 3.0)
    with pytest.raises(ProblemError, match="cpsat cannot represent the equality"):
        solve(problem, "cpsat")
    with pytest.raises(InfeasibleError):  # no choice sums to exactly 3.0 ms
        solve(problem, "pulp")


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ProblemError, match=r"unknown backend 'gurobi'; known backends: \['cpsat', 'ortools-mip', "):
        solve(random_problem(0), "gurobi")
