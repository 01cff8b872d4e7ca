"""Why is a problem infeasible? The best each constraint can do, alone and given the others.

Alone: the extreme of a row's left-hand side over all exact covers of the layers is a shortest
path (candidates are runs of consecutive layers), so :func:`cover_extreme` computes it exactly in
one pass; a constraint whose best is still short of its target is infeasible on its own, and the
message says by how much (``memory <= 40.000 GiB: the smallest achievable memory is 52.310
GiB``). When every constraint can be met alone but not together, each inequality is optimized
subject to all the others (one extra solve each) to report the best it can reach jointly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from solvers.constraints import REL_TOL, Constraint
from solvers.errors import InfeasibleError
from solvers.model import LinearConstraint, Model, RawResult
from solvers.problem import Problem

MAX_JOINT_SOLVES = 12
"""Above this many constraints the joint diagnosis (one solve per constraint) is skipped."""


def cover_extreme(problem: Problem, coefs: Mapping[int, float], *, maximize: bool = False) -> float:
    """min (or max) of ``sum coefs[c] * x_c`` over every way to cover each layer exactly once."""
    sign = -1.0 if maximize else 1.0
    starting: list[list[int]] = [[] for _ in range(problem.num_layers)]
    for i, c in enumerate(problem.candidates):
        starting[c.layers[0]].append(i)
    best = [math.inf] * (problem.num_layers + 1)  # best[l]: layers 0..l-1 covered
    best[0] = 0.0
    for start in range(problem.num_layers):
        if math.isinf(best[start]):
            continue
        for i in starting[start]:
            end = start + len(problem.candidates[i].layers)
            best[end] = min(best[end], best[start] + sign * coefs.get(i, 0.0))
    return sign * best[-1]


def _met(row: LinearConstraint, lhs: float) -> bool:
    tol = REL_TOL * max(1.0, abs(row.rhs))
    return {"<=": lhs <= row.rhs + tol, ">=": lhs >= row.rhs - tol, "==": abs(lhs - row.rhs) <= tol}[row.sense]


def _best_word(con: Constraint) -> str:
    return {"<=": "smallest", ">=": "largest", "==": "closest"}[con.sense]


def explain_infeasible(
    problem: Problem,
    pairs: Sequence[tuple[Constraint, LinearConstraint]],
    *,
    solve_model: Callable[..., RawResult] | None = None,
    time_limit: float | None = None,
) -> InfeasibleError:
    """The error to raise for an infeasible problem: what each constraint can achieve, in its units."""
    diagnosis: dict[str, dict] = {}
    alone: list[str] = []
    for con, row in pairs:
        lo, hi = cover_extreme(problem, row.coefs), cover_extreme(problem, row.coefs, maximize=True)
        best_lhs = {"<=": lo, ">=": hi, "==": lo if row.rhs < lo else hi}[row.sense]
        best = con.from_lhs(problem, best_lhs)
        infeasible_alone = not (_met(row, best_lhs) if row.sense != "==" else lo - 1e-9 <= row.rhs <= hi + 1e-9)
        diagnosis[con.name] = {"sense": con.sense, "requested": con.target, "best": best,
                               "alone": infeasible_alone, "given_others": False}
        if infeasible_alone:
            alone.append(f"{con.name}: the {_best_word(con)} achievable {con.quantity} is {con.format(best)}")
    if alone:
        return InfeasibleError("infeasible: " + "; ".join(alone), diagnosis=diagnosis)
    if not pairs:
        return InfeasibleError("infeasible, although the problem has no constraints (a solver error?)")
    joint = _joint(problem, pairs, diagnosis, solve_model, time_limit) if solve_model else []
    reason = "infeasible: each constraint can be met alone, but not all together"
    if joint:
        reason += "; given the other constraints, " + "; ".join(joint)
    else:
        reason += ": " + "; ".join(f"{c.name} (alone: {_best_word(c)} {c.format(diagnosis[c.name]['best'])})"
                                   for c, _ in pairs)
    return InfeasibleError(reason, diagnosis=diagnosis)


def _joint(problem: Problem, pairs: Sequence[tuple[Constraint, LinearConstraint]], diagnosis: dict,
           solve_model: Callable[..., RawResult], time_limit: float | None) -> list[str]:
    """Optimize each inequality's left-hand side subject to all the other rows."""
    if len(pairs) > MAX_JOINT_SOLVES:
        return []
    out = []
    n = len(problem.candidates)
    for k, (con, row) in enumerate(pairs):
        if row.sense == "==":
            continue
        others = tuple(r for j, (_, r) in enumerate(pairs) if j != k)
        model = Model(objective=tuple(row.coefs.get(i, 0.0) for i in range(n)), cover=problem.cover,
                      rows=others, maximize=row.sense == ">=")
        raw = solve_model(model, time_limit=time_limit)
        if raw.status not in ("optimal", "feasible"):
            out.append(f"{con.name}: the others cannot be met together even without it")
            continue
        best = con.from_lhs(problem, sum(row.coefs.get(i, 0.0) for i in raw.chosen))
        diagnosis[con.name].update(best=best, given_others=True)
        out.append(f"{con.name}: the {_best_word(con)} achievable {con.quantity} is {con.format(best)}")
    return out
