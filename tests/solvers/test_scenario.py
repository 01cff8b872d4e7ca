"""The serving scenario: its sizes, its validation, and what the MIP makes of phase, batch, length and replicas."""

from __future__ import annotations

import dataclasses
import math

import pytest

import solvers
from solvers.backends import BACKENDS, solve
from solvers.constraints import Budget
from solvers.errors import ProblemError
from solvers.problem import Candidate, Problem
from solvers.scenario import Scenario
from tests.solvers.helpers import brute_force, random_problem

PARENT, SMALL = "gqa:8|swiglu:1024", "no_op|swiglu:1024"


def two_layers(scenario: Scenario) -> Problem:
    """2 layers x (parent: 2 ms, 10 KV bytes per token; no-attention: 1 ms, no KV cache), fixed 1 ms.

    The same ms in a ``prefill_ms`` and a ``decode_ms`` column, so one problem serves both phases.
    """
    cands = []
    for layer in range(2):
        for label, ms, kv, kl in ((PARENT, 2.0, 10, 0.0), (SMALL, 1.0, 0, 0.25 + 0.5 * layer)):
            cands.append(Candidate(id=f"{layer}:{label}", layers=(layer,), members=(label,),
                                   costs={"params": 100, "weight_bytes": 200, "kv_bytes_per_token": kv,
                                          "prefill_ms": ms, "decode_ms": ms},
                                   scores={"kl": kl}, attrs={"is_parent": label == PARENT}))
    return Problem(candidates=tuple(cands), score_column="kl", scenario=scenario,
                   fixed={"weight_bytes": 100, "prefill_ms": 1.0, "decode_ms": 1.0})


def test_sizes_of_each_phase():
    prefill = Scenario(name="p", phase="prefill", batch=4, length=512, replicas=2)
    assert (prefill.new_tokens, prefill.attended, prefill.tokens, prefill.kv_tokens) == (512, 512, 2048, 512)
    assert (prefill.cache_tokens, prefill.node_tokens) == (4 * 512, 2 * 4 * 512)
    decode = Scenario(name="d", phase="decode", batch=64, length=4096, replicas=3)
    assert (decode.new_tokens, decode.attended, decode.tokens, decode.kv_tokens) == (1, 4097, 64, 4097)
    assert (decode.cache_tokens, decode.node_tokens) == (64 * 4097, 3 * 64)
    assert decode.throughput(8.0) == pytest.approx(3 * 64 * 1000 / 8.0)
    assert decode.max_step_ms(decode.throughput(8.0)) == pytest.approx(8.0)
    assert (decode.column, decode.describe()) == ("d_ms", "d: decode, batch 64, context 4096, 3 replicas")
    assert Scenario() == Scenario(name="decode", phase="decode", batch=1, length=1024, replicas=1)


def test_prefill_throughput_counts_every_prompt_token_of_every_replica():
    p = two_layers(Scenario(name="prefill", phase="prefill", batch=3, length=100, replicas=2))
    t = p.totals(p.parent)
    assert t.step_ms == 5.0  # 2 + 2 + fixed 1
    assert t.throughput == pytest.approx(2 * 3 * 100 * 1000 / 5.0)  # 120000 tokens/s, not batch / step = 600
    assert t.kv_cache_bytes == 2 * 10 * 3 * 100  # prefill: the cache holds the prompt
    # a budget between the parent (120000) and the all-small model (200000): one layer must go, the cheaper one
    sol = solve(p.with_budget(throughput=150_000.0))
    assert sol.layer_labels() == [SMALL, PARENT] and sol.totals.step_ms == 4.0
    assert sol.totals.throughput == pytest.approx(150_000.0)
    (check,) = sol.checks
    assert check.name == "throughput >= 150000 tokens/s" and check.slack == pytest.approx(0.0, abs=1e-6)


def test_replicas_multiply_throughput_but_not_memory_or_speedup():
    one = two_layers(Scenario(name="decode", phase="decode", batch=8, length=99))
    four = one.replace(scenario=dataclasses.replace(one.scenario, replicas=4))
    chosen = (1, 2)  # layer 0 small, layer 1 parent
    a, b = one.totals(chosen), four.totals(chosen)
    assert a.throughput == pytest.approx(8 * 1000 / 4.0) and b.throughput == pytest.approx(4 * a.throughput)
    assert (b.memory_bytes, b.kv_cache_bytes, b.step_ms) == (a.memory_bytes, a.kv_cache_bytes, a.step_ms)
    assert b.speedup == a.speedup == pytest.approx(5.0 / 4.0)
    # the same node target needs a slower step per replica with 4 replicas: the parent now passes
    target = 3.0 * one.totals(one.parent).throughput
    assert solve(four.with_budget(throughput=target)).layer_labels() == [PARENT, PARENT]
    assert math.isinf(brute_force(one.with_budget(throughput=target))[0])


def test_kv_memory_is_batch_times_kv_tokens():
    decode = two_layers(Scenario(name="decode", phase="decode", batch=8, length=99, replicas=5))
    t = decode.totals(decode.parent)
    assert t.kv_cache_bytes == 2 * 10 * 8 * 100  # decode: context 99 + the new token, per device
    assert t.memory_bytes == 100 + 2 * 200 + 2 * 10 * 8 * 100
    # the compiled memory row agrees: a budget 1 byte short of the parent forces a no-attention layer
    sol = solve(decode.with_budget(memory_bytes=t.memory_bytes - 1))
    assert sol.layer_labels() == [SMALL, PARENT] and sol.totals.kv_cache_bytes == 10 * 8 * 100


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_throughput_budget_with_replicas_matches_brute_force(backend):
    for seed in range(8):
        one = random_problem(400 + seed, budgets=False)
        three = one.replace(scenario=dataclasses.replace(one.scenario, replicas=3))
        target = 1.4 * three.totals(three.parent).throughput  # tokens/s of the 3 replicas together
        problem = three.with_budget(throughput=target, memory_bytes=0.9 * three.totals(three.parent).memory_bytes)
        best, _ = brute_force(problem)
        assert 0.0 < best < math.inf  # the budget binds (the parent scores 0) and can be met
        sol = solve(problem, backend)
        assert sol.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert sol.totals.throughput >= target * (1 - 1e-9)
        # 3 replicas at a node target = 1 replica at a third of it
        assert best == pytest.approx(brute_force(one.with_budget(throughput=target / 3,
                                                                 memory_bytes=problem.budget.memory_bytes))[0])


@pytest.mark.parametrize(("fields", "needle"), [
    ({"name": "2long"}, "scenario name '2long' must be an identifier"),
    ({"name": "x", "phase": "train"}, "scenario 'x': phase must be one of ('prefill', 'decode'), got 'train'"),
    ({"batch": 0}, "scenario 'decode': batch must be >= 1, got 0"),
    ({"length": 0}, "scenario 'decode': length must be >= 1, got 0"),
    ({"replicas": -2}, "scenario 'decode': replicas must be >= 1, got -2"),
    ({"batch": 2.5}, "scenario 'decode': batch must be an integer, got 2.5"),
    ({"length": "1024"}, "scenario 'decode': length must be an integer, got '1024'"),
    ({"replicas": True}, "scenario 'decode': replicas must be an integer, got True"),
])
def test_bad_fields_raise_problem_error_naming_the_field(fields, needle):
    with pytest.raises(ProblemError) as info:
        Scenario(**fields)
    assert str(info.value).startswith(needle) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_dict_round_trip_and_integer_like_fields():
    np = pytest.importorskip("numpy")
    sc = Scenario(name="p2k", phase="prefill", batch=np.int64(2), length=2048, replicas=4)
    assert type(sc.batch) is int
    assert sc.to_dict() == {"name": "p2k", "phase": "prefill", "batch": 2, "length": 2048, "replicas": 4}
    assert Scenario.from_dict(sc.to_dict()) == sc
    assert Scenario.from_dict({"phase": "prefill"}) == Scenario(phase="prefill")
    with pytest.raises(ProblemError, match=r"unknown field\(s\) \['context'\]"):
        Scenario.from_dict({"name": "decode", "context": 4096})


def test_one_scenario_type_exported():
    assert solvers.Scenario is Scenario
    assert "Scenario" not in vars(solvers.problem) or solvers.problem.Scenario is Scenario
    with pytest.raises(ProblemError, match="scenario must be a solvers.Scenario"):
        two_layers(Scenario()).replace(scenario={"name": "decode"})
    assert Budget(throughput=1.0).constraints()[0].max_step_ms(two_layers(Scenario(batch=2))) == 2000.0
