"""Random small problems and a brute-force reference for the solver tests."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from functools import cache

from solvers.constraints import Budget
from solvers.problem import Candidate, Problem
from solvers.scenario import Scenario

PARENT = "gqa:8|swiglu:1024"
LABELS = [PARENT, "gqa:2|swiglu:512", "no_op|swiglu:1024", "gqa:4|no_op", "linear|linear", "no_op|no_op"]
FUSED = "no_op|swiglu:2048"


@cache
def random_problem(seed: int, *, layers: int = 6, variants: int = 4, fused: bool = False,
                   budgets: bool = True) -> Problem:
    """``layers`` x ``variants`` candidates (variant 0 is the parent), optionally 2-layer fused runs.

    Costs are integers (params, bytes) or floats (ms); scores are positive except the parent's 0.
    With ``budgets``, memory and throughput targets are drawn between the best and the worst total.
    """
    rng = random.Random(seed)
    cands = []
    for layer in range(layers):
        for v, label in enumerate(LABELS[:variants]):
            params = 1000 if v == 0 else rng.randint(0, 900)
            kv = 0 if label.startswith("no_op") or label.startswith("linear") else rng.randint(1, 64)
            cands.append(Candidate(
                id=f"{layer}:{label}", layers=(layer,), members=(label,),
                costs={"params": params, "weight_bytes": 2 * params, "kv_bytes_per_token": kv,
                       "decode_ms": (1.0 if v == 0 else rng.uniform(0.05, 0.95)) + rng.uniform(0, 0.01)},
                scores={"kl": 0.0 if v == 0 else rng.uniform(0.01, 1.0), "loss_delta": rng.uniform(0, 1)},
                attrs={"is_parent": v == 0}))
    if fused:
        for layer in range(0, layers - 1, 2):
            if rng.random() < 0.7:
                params = rng.randint(600, 1500)
                cands.append(Candidate(
                    id=f"{layer}-{layer + 1}:fused", layers=(layer, layer + 1), members=(FUSED, FUSED),
                    costs={"params": params, "weight_bytes": 2 * params, "kv_bytes_per_token": 0,
                           "decode_ms": rng.uniform(0.3, 1.2)},
                    scores={"kl": rng.uniform(0.05, 1.0), "loss_delta": rng.uniform(0, 1)}))
    scenario = Scenario(name="decode", phase="decode", batch=4, length=15)  # 16 KV-cache tokens per sequence
    problem = Problem(candidates=tuple(cands), score_column="kl", scenario=scenario,
                      fixed={"params": 500, "weight_bytes": 1000, "decode_ms": 0.5})
    if not budgets:
        return problem
    totals = [problem.totals(c) for c in covers(problem)]
    mem, thr = [t.memory_bytes for t in totals], [t.throughput for t in totals]
    return problem.replace(budget=Budget(
        memory_bytes=rng.uniform(min(mem), max(mem)) if rng.random() < 0.8 else None,
        throughput=rng.uniform(min(thr), max(thr)) if rng.random() < 0.8 else None))


def covers(problem: Problem, start: int = 0) -> Iterator[tuple[int, ...]]:
    """Every way to cover layers ``start..`` exactly once."""
    if start == problem.num_layers:
        yield ()
        return
    for i, c in enumerate(problem.candidates):
        if c.layers[0] == start:
            for rest in covers(problem, start + len(c.layers)):
                yield (i, *rest)


@cache
def brute_force(problem: Problem) -> tuple[float, tuple[int, ...] | None]:
    """The optimum by enumeration: ``(objective, chosen)``, ``(inf, None)`` when infeasible.

    Feasibility is each constraint's own ``check`` (its ``measure`` half; no compiled rows).
    """
    best, arg = math.inf, None
    constraints = problem.all_constraints()
    score = problem.column(problem.score_column)
    for chosen in covers(problem):
        obj = sum(score[i] for i in chosen)
        if obj < best and all(c.check(problem, chosen).ok for c in constraints):
            best, arg = obj, chosen
    return best, arg
