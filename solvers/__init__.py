"""Mixed-integer programs that pick one block variant per layer (pure Python; never imports torch).

    from solvers import Budget, Scenario, read_problem, solve
    from solvers.parse import parse_constraint

    problem = read_problem("scores.csv", "costs.csv", score_column="kl",
                           scenario=Scenario(name="decode", phase="decode", batch=64, length=4096,
                                            replicas=2),
                           budget=Budget(memory_bytes=80 * 2**30, throughput=2000.0),
                           constraints=[parse_constraint("count(attention != no_op) >= 8")])
    solution = solve(problem)                      # SCIP; or backend="pulp" / "cpsat"
    print(solution.summary())

Modules: ``scenario`` (how the model is served), ``problem`` (candidates, totals), ``constraints`` (budget constraints),
``expressions`` / ``parse`` (custom constraints), ``model`` (the compiled rows backends solve),
``backends`` (pulp / cpsat / ortools-mip and :func:`solve`), ``verify``, ``diagnose``
(infeasibility), ``diverse``, ``frontier``, ``plot``, ``io`` (table formats), ``errors``.
"""

from solvers.backends import BACKENDS, solve
from solvers.constraints import Budget
from solvers.errors import InfeasibleError, ProblemError, SolverError, VerificationError
from solvers.io import read_problem
from solvers.problem import Candidate, Problem
from solvers.scenario import Scenario

__all__ = ["BACKENDS", "Budget", "Candidate", "InfeasibleError", "Problem", "ProblemError", "Scenario",
           "SolverError", "VerificationError", "read_problem", "solve"]
