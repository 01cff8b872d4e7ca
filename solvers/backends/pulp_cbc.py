"""PuLP with its bundled CBC: the default backend.

Rows and the objective are divided by their largest |coefficient| before they reach CBC, so its
absolute tolerances are relative to each row's scale (bytes rows have coefficients ~1e9, scores
~1e-3). CBC's default ``increment`` (a new incumbent must improve by 1e-5 in absolute terms)
returns a solution up to 1e-5 worse than the optimum as "optimal"; it is set to 1e-9 here. CBC's
integer preprocessing (CglPreProcess, CBC 2.10.3 as bundled) fixed the wrong variables on a
6-layer problem (``tests/solvers``: random_problem(8), after the dominance presolve) and returned a
worse choice as optimal; it is turned off, which also makes the Ultra-sized solves 2-3x faster.
PuLP does not expose CBC's best bound: the gap is 0 when CBC proves optimality (relative gap
limit 0), NaN when it stops early.
"""

from __future__ import annotations

import math
import re
import warnings

import pulp

from solvers.model import Model, RawResult, chosen_from_values


def _name(i: int, text: str) -> str:
    """PuLP/CBC constraint names: unique, no spaces or operators."""
    return f"c{i}_" + re.sub(r"\W+", "_", text)[:60]


def _binary(prob: pulp.LpProblem, name: str) -> pulp.LpVariable:
    if hasattr(prob, "add_variable"):  # PuLP >= 3.3 attaches variables to their problem
        return prob.add_variable(name, 0, 1, cat=pulp.LpBinary)
    return pulp.LpVariable(name, cat=pulp.LpBinary)


def _cbc(time_limit: float | None, threads: int | None) -> pulp.LpSolver:
    with warnings.catch_warnings():  # PuLP 3.3 announces that 4.0 moves CBC to the pulp[cbc] extra
        warnings.filterwarnings("ignore", message=".*PULP_CBC_CMD is deprecated.*")
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=0.0, gapAbs=0.0, threads=threads,
                                 options=["increment 1e-9", "preprocess off"])


def solve_model(model: Model, *, time_limit: float | None = None, threads: int | None = None) -> RawResult:
    # Data
    n = model.num_candidates
    sense = pulp.LpMaximize if model.maximize else pulp.LpMinimize
    prob = pulp.LpProblem("puzzle", sense)

    # Variables: x[c] = 1 when candidate c is chosen.
    x = [_binary(prob, f"x{c}") for c in range(n)]

    # Constraints
    # Each layer is covered by exactly one chosen candidate.
    for layer, cands in enumerate(model.cover):
        prob += pulp.lpSum(x[c] for c in cands) == 1, f"cover_layer_{layer}"
    # Each budget / custom / diversity row, scaled to unit largest coefficient.
    for i, row in enumerate(model.rows):
        scale = max((abs(v) for v in row.coefs.values()), default=1.0) or 1.0
        lhs = pulp.LpAffineExpression([(x[c], v / scale) for c, v in row.coefs.items()])
        rhs = row.rhs / scale
        con = {"<=": lhs <= rhs, ">=": lhs >= rhs, "==": lhs == rhs}[row.sense]
        prob += con, _name(i, row.name)

    # Objective: the summed score column (or, for diagnoses, a row's left-hand side), scaled likewise.
    obj_scale = max(map(abs, model.objective), default=1.0) or 1.0
    prob += pulp.LpAffineExpression([(x[c], v / obj_scale) for c, v in enumerate(model.objective) if v])

    # Solve
    prob.solve(_cbc(time_limit, threads))
    status = pulp.LpStatus[prob.status]
    if status == "Infeasible":
        return RawResult("infeasible")
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return RawResult("unknown", info={"pulp_status": status})
    chosen = chosen_from_values([v.varValue for v in x])
    objective = (pulp.value(prob.objective) or 0.0) * obj_scale  # None when every coefficient is 0
    optimal = prob.sol_status == pulp.LpSolutionOptimal
    return RawResult("optimal" if optimal else "feasible", chosen, objective,
                     bound=objective if optimal else math.nan)
