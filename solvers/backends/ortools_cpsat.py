"""OR-tools CP-SAT. It solves over the integers, so every coefficient is made an integer first.

Scaling, row by row:

* integer coefficients (bytes, parameters, counts, diversity): used as they are, the bound
  rounded down for ``<=`` (up for ``>=``), which is exact since the sum is an integer;
* otherwise (milliseconds, say) the row is multiplied by 2^k so that its largest |coefficient| is
  about 2^40, coefficients are rounded *up* and the bound *down* for ``<=`` (the reverse for
  ``>=``). Every choice that meets the integer row meets the real one (conservative: verification
  on the real costs always passes); a choice whose real slack is below ``n_layers / 2^k`` (about
  1.5e-10 of the largest coefficient for 162 layers) can be lost;
* a non-integer ``==`` row cannot be scaled conservatively and is refused (use pulp or ortools-mip).

The objective is scaled the same way and rounded to nearest (each chosen score moves by at most
half a unit), so the integer optimum is within ``n_layers / 2^k`` (about 1.5e-10 of the largest
score for 162 layers) of the real optimum. CP-SAT's gap comes from its best objective bound.
"""

from __future__ import annotations

import math

from ortools.sat.python import cp_model

from solvers.errors import ProblemError
from solvers.model import LinearConstraint, Model, RawResult

BITS = 40


def _scale(values: list[float]) -> float:
    """1 when every value is an integer, else 2^k with the largest |value| * 2^k about 2^BITS."""
    top = max(map(abs, values), default=0.0)
    if all(float(v).is_integer() for v in values) and top < 2**BITS:
        return 1.0
    return 2.0 ** (BITS - math.ceil(math.log2(top or 1.0)))


def _integer_row(row: LinearConstraint) -> tuple[dict[int, int], int, int]:
    """A conservative integer version of ``row``: ``(coefs, lower, upper)`` with ``lower <= sum <= upper``."""
    hi = sum(v for v in row.coefs.values() if v > 0)
    lo = sum(v for v in row.coefs.values() if v < 0)
    rhs = min(max(row.rhs, lo - 1.0), hi + 1.0)  # a bound beyond every reachable sum stays so, and fits int64
    scale = _scale(list(row.coefs.values()))
    if row.sense == "==" and scale != 1.0:
        raise ProblemError(f"cpsat cannot represent the equality {row.name!r} with non-integer "
                           f"coefficients exactly; use the pulp or ortools-mip backend")
    if row.sense == "<=":  # coefficients up, bound down
        return {c: math.ceil(v * scale) for c, v in row.coefs.items()}, cp_model.INT_MIN, math.floor(rhs * scale)
    if row.sense == ">=":  # coefficients down, bound up
        return {c: math.floor(v * scale) for c, v in row.coefs.items()}, math.ceil(rhs * scale), cp_model.INT_MAX
    # integer coefficients: a fractional bound gives ceil > floor, an empty (infeasible) range
    return {c: int(v) for c, v in row.coefs.items()}, math.ceil(rhs), math.floor(rhs)


def solve_model(model: Model, *, time_limit: float | None = None, threads: int | None = None) -> RawResult:
    # Data
    n = model.num_candidates
    obj_scale = _scale(list(model.objective))
    cp = cp_model.CpModel()

    # Variables: x[c] = 1 when candidate c is chosen.
    x = [cp.new_bool_var(f"x{c}") for c in range(n)]

    # Constraints
    # Each layer is covered by exactly one chosen candidate.
    for layer, cands in enumerate(model.cover):
        cp.add_exactly_one([x[c] for c in cands]).with_name(f"cover_layer_{layer}")
    # Each budget / custom / diversity row, as a conservative integer row.
    for row in model.rows:
        coefs, lower, upper = _integer_row(row)
        lhs = cp_model.LinearExpr.weighted_sum([x[c] for c in coefs], list(coefs.values()))
        cp.add_linear_constraint(lhs, lower, upper).with_name(row.name)

    # Objective: the summed score column, scaled to integers and rounded to nearest.
    weights = [round(v * obj_scale) for v in model.objective]
    objective = cp_model.LinearExpr.weighted_sum(x, weights)
    cp.maximize(objective) if model.maximize else cp.minimize(objective)

    # Solve
    solver = cp_model.CpSolver()
    if time_limit is not None:
        solver.parameters.max_time_in_seconds = float(time_limit)
    if threads is not None:
        solver.parameters.num_workers = int(threads)
    status = solver.solve(cp)
    if status == cp_model.INFEASIBLE:
        return RawResult("infeasible")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return RawResult("unknown", info={"cpsat_status": solver.status_name(status)})
    chosen = tuple(c for c in range(n) if solver.boolean_value(x[c]))
    return RawResult("optimal" if status == cp_model.OPTIMAL else "feasible", chosen,
                     objective=solver.objective_value / obj_scale, bound=solver.best_objective_bound / obj_scale,
                     info={"objective_scale": obj_scale})
