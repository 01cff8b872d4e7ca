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

Modules: ``scenario`` (how the model is served), ``candidates`` (candidates, totals), ``constraints`` (budget
constraints), ``problem`` (candidates with a budget), ``predicates`` / ``expressions`` / ``parse`` (custom
constraints), ``model`` (the compiled rows backends solve), ``backends`` (pulp / cpsat / ortools-mip and
:func:`solve`), ``verify``, ``diagnose`` (infeasibility), ``diverse``, ``frontier``, ``plot``, ``io`` (table
formats), ``files`` (atomic writes), ``errors``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from solvers.backends import BACKENDS, solve
    from solvers.constraints import Budget
    from solvers.errors import InfeasibleError, ProblemError, SolverError, VerificationError
    from solvers.io import read_problem
    from solvers.problem import Candidate, Problem
    from solvers.scenario import Scenario

_HOMES = {"BACKENDS": "backends", "solve": "backends", "Budget": "constraints", "InfeasibleError": "errors",
          "ProblemError": "errors", "SolverError": "errors", "VerificationError": "errors", "read_problem": "io",
          "Candidate": "problem", "Problem": "problem", "Scenario": "scenario"}
"""Where each name of ``__all__`` lives. They are imported on first use, so that ``solvers.files`` (which
:mod:`puzzle.io` uses) does not load pandas and the MIP backends."""

__all__ = ["BACKENDS", "Budget", "Candidate", "InfeasibleError", "Problem", "ProblemError", "Scenario",
           "SolverError", "VerificationError", "read_problem", "solve"]


def __getattr__(name: str) -> object:
    if name in _HOMES:
        value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
        globals()[name] = value
        return value
    try:  # a submodule, as ``import solvers; solvers.problem`` found it when this file imported them all
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
