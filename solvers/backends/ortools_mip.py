"""OR-tools' MIP interface (``pywraplp``), with SCIP by default (``solver_id="CBC"`` etc. also work).

Rows and the objective are divided by their largest |coefficient|, as for PuLP, so the solver's
absolute tolerances are relative to each row's scale. The gap comes from the solver's best bound.
"""

from __future__ import annotations

import re

from ortools.linear_solver import pywraplp

from solvers.errors import ProblemError
from solvers.model import Model, RawResult, chosen_from_values

SOLVER_ID = "SCIP"


def solve_model(model: Model, *, time_limit: float | None = None, threads: int | None = None,
                solver_id: str = SOLVER_ID) -> RawResult:
    # Data
    n = model.num_candidates
    solver = pywraplp.Solver.CreateSolver(solver_id)
    if solver is None:
        raise ProblemError(f"OR-tools has no MIP solver {solver_id!r} in this build; try SCIP or CBC")

    # Variables: x[c] = 1 when candidate c is chosen.
    x = [solver.BoolVar(f"x{c}") for c in range(n)]

    # Constraints
    # Each layer is covered by exactly one chosen candidate.
    for layer, cands in enumerate(model.cover):
        row = solver.Constraint(1.0, 1.0, f"cover_layer_{layer}")
        for c in cands:
            row.SetCoefficient(x[c], 1.0)
    # Each budget / custom / diversity row, scaled to unit largest coefficient.
    for i, spec in enumerate(model.rows):
        scale = max((abs(v) for v in spec.coefs.values()), default=1.0) or 1.0
        rhs = spec.rhs / scale
        lower = rhs if spec.sense in (">=", "==") else -solver.infinity()
        upper = rhs if spec.sense in ("<=", "==") else solver.infinity()
        row = solver.Constraint(lower, upper, f"c{i}_" + re.sub(r"\W+", "_", spec.name)[:60])
        for c, v in spec.coefs.items():
            row.SetCoefficient(x[c], v / scale)

    # Objective: the summed score column (or, for diagnoses, a row's left-hand side).
    obj_scale = max(map(abs, model.objective), default=1.0) or 1.0
    objective = solver.Objective()
    for c, v in enumerate(model.objective):
        objective.SetCoefficient(x[c], v / obj_scale)
    objective.SetMaximization() if model.maximize else objective.SetMinimization()

    # Solve
    if time_limit is not None:
        solver.SetTimeLimit(int(time_limit * 1000))
    if threads is not None:
        solver.SetNumThreads(int(threads))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, 0.0)
    status = solver.Solve(params)
    if status == pywraplp.Solver.INFEASIBLE:
        return RawResult("infeasible")
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        return RawResult("unknown", info={"mip_status": status})
    chosen = chosen_from_values([v.solution_value() for v in x])
    value, bound = objective.Value() * obj_scale, objective.BestBound() * obj_scale
    return RawResult("optimal" if status == pywraplp.Solver.OPTIMAL else "feasible", chosen, value, bound=bound)
