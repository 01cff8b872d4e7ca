"""Mixed-integer programs that pick one block variant per layer (pure Python; never imports torch).

    from solvers import Budget, Scenario, read_problem, solve
    from solvers.parse import parse_constraint

    problem = read_problem("scores.csv", "costs.csv", score_column="kl",
                           scenario=Scenario(name="decode", batch=64, context=4096),
                           budget=Budget(memory_bytes=80 * 2**30, throughput=2000.0),
                           constraints=[parse_constraint("count(attention != no_op) >= 8")])
    solution = solve(problem)                      # SCIP; or backend="pulp" / "cpsat"
    print(solution.summary())

Modules: ``problem`` (candidates, scenario, totals), ``constraints`` (budget constraints),
``expressions`` / ``parse`` (custom constraints), ``model`` (the compiled rows backends solve),
``backends`` (pulp / cpsat / ortools-mip and :func:`solve`), ``verify``, ``diagnose``
(infeasibility), ``diverse``, ``frontier``, ``plot``, ``io`` (table formats), ``errors``.
"""

from solvers.backends import BACKENDS, solve
from solvers.constraints import Budget
from solvers.errors import InfeasibleError, ProblemError, SolverError, VerificationError
from solvers.io import read_problem
from solvers.problem import Candidate, Problem, Scenario

__all__ = ["BACKENDS", "Budget", "Candidate", "InfeasibleError", "Problem", "ProblemError", "Scenario",
           "SolverError", "VerificationError", "read_problem", "solve"]
