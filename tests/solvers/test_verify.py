"""Trust but verify: every total is recomputed from the chosen candidates, not taken from a solver."""

from __future__ import annotations

import pytest

import solvers.backends
from solvers.backends import solve
from solvers.errors import VerificationError
from solvers.expressions import attention, count
from solvers.model import RawResult
from solvers.verify import verify
from tests.solvers.helpers import random_problem


@pytest.fixture(scope="module")
def solved():
    base = random_problem(4, budgets=False)
    parent = base.totals(base.parent)
    problem = base.with_budget(memory_bytes=0.8 * parent.memory_bytes, throughput=1.3 * parent.throughput)
    return solve(problem.with_constraints(count(attention != "no_op") >= 4))


def test_totals_are_sums_of_the_chosen_candidates(solved):
    p, t = solved.problem, solved.totals
    cands = solved.candidates
    assert t.params == sum(c.costs["params"] for c in cands) + 500
    assert t.weight_bytes == sum(c.costs["weight_bytes"] for c in cands) + 1000
    assert t.kv_cache_bytes == sum(c.costs["kv_bytes_per_token"] for c in cands) * 4 * 16
    assert t.memory_bytes == t.weight_bytes + t.kv_cache_bytes
    assert t.step_ms == pytest.approx(sum(c.costs["decode_ms"] for c in cands) + 0.5)
    assert t.throughput == pytest.approx(4 / (t.step_ms / 1000))
    assert t.speedup == pytest.approx(t.parent_step_ms / t.step_ms)
    assert t.objective == pytest.approx(sum(c.scores["kl"] for c in cands))
    assert [c.name for c in solved.checks] == ["memory <= 19.606 KiB", "throughput >= 796.958 tokens/s",
                                               "count(attention != no_op) >= 4"]
    assert all(c.ok and c.slack >= 0 for c in solved.checks)
    assert p.num_layers == 6 and len(solved.chosen) == 6


def test_a_tampered_choice_fails_verification(solved):
    p = solved.problem
    heaviest = max(p.cover[0], key=lambda i: p.candidates[i].costs["weight_bytes"])
    lightest = min(p.cover[0], key=lambda i: p.candidates[i].costs["decode_ms"])
    assert verify(p, solved.chosen, reported_objective=solved.objective)  # the untouched one passes
    with pytest.raises(VerificationError, match="the solver reports objective"):
        verify(p, solved.chosen, reported_objective=solved.objective + 0.5)
    with pytest.raises(VerificationError, match=r"covered exactly once; \(layer, times covered\): \[\(0, 0\)\]"):
        verify(p, solved.chosen[1:])
    with pytest.raises(VerificationError, match=r"\[\(0, 2\)\]"):
        verify(p, (heaviest, *solved.chosen))
    # swap layer 0 for the fastest no-attention block and every other layer for the parent's: too slow, too big
    tampered = (lightest, *p.parent[1:])
    with pytest.raises(VerificationError) as e:
        verify(p, tampered)
    assert "throughput >= 796.958 tokens/s is violated" in str(e.value)
    assert "memory <= 19.606 KiB is violated" in str(e.value)


def test_solve_refuses_a_solver_answer_that_does_not_check_out(solved, monkeypatch):
    p = solved.problem
    tampered = (*p.parent,)

    def lying_backend(model, **_):
        return RawResult("optimal", tampered, objective=0.0, bound=0.0)

    monkeypatch.setattr(solvers.backends, "get_backend", lambda name: lying_backend)
    with pytest.raises(VerificationError, match="throughput >= 796.958 tokens/s is violated"):
        solve(p, "pulp")
