"""Backends by name, and :func:`solve`: compile, solve, diagnose or verify.

=============== ================================================= ==========================
name            solver                                            module
=============== ================================================= ==========================
``pulp``        CBC bundled with PuLP                             :mod:`.pulp_cbc`
``cpsat``       OR-tools CP-SAT, integer-scaled coefficients      :mod:`.ortools_cpsat`
``ortools-mip`` OR-tools ``pywraplp`` MIP interface (SCIP; default)  :mod:`.ortools_mip`
=============== ================================================= ==========================

Each backend module has ``solve_model(model, *, time_limit=None, threads=None) -> RawResult``.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable

from solvers.diagnose import explain_infeasible
from solvers.errors import ProblemError, SolverFailure
from solvers.model import RawResult, prune_dominated
from solvers.problem import Problem
from solvers.solution import Solution
from solvers.verify import verify

log = logging.getLogger(__name__)

# SCIP through OR-tools: on SmolLM2-shaped problems (30 identical layers, one latency budget) it
# proves optimality in < 0.1-3 s where CBC needs 20-40 s and CP-SAT up to 12 s; see the README.
DEFAULT_BACKEND = "ortools-mip"
BACKENDS = {
    "pulp": "solvers.backends.pulp_cbc",
    "cpsat": "solvers.backends.ortools_cpsat",
    "ortools-mip": "solvers.backends.ortools_mip",
}


def get_backend(name: str) -> Callable[..., RawResult]:
    """The ``solve_model`` function of a backend; :class:`ProblemError` lists the known names."""
    if name not in BACKENDS:
        raise ProblemError(f"unknown backend {name!r}; known backends: {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[name]).solve_model


def solve(problem: Problem, backend: str = DEFAULT_BACKEND, *, time_limit: float | None = None,
          threads: int | None = None, explain: bool = True, presolve: bool = True) -> Solution:
    """The best choice for ``problem``, verified; :class:`InfeasibleError` (with a diagnosis) if none.

    ``presolve`` first drops dominated candidates (:func:`solvers.model.prune_dominated`; exact).
    ``explain=False`` skips the extra solves of the joint infeasibility diagnosis (the per-constraint
    bounds are always reported). Raises :class:`SolverFailure` if the solver stops without a
    solution (time limit), :class:`VerificationError` if its answer does not check out.
    """
    solve_model = get_backend(backend)
    model, pairs = problem.compile()
    t0 = time.perf_counter()
    kept = tuple(range(model.num_candidates))
    if presolve:
        model, kept = prune_dominated(model)
        log.debug("presolve kept %d of %d candidates", len(kept), len(problem.candidates))
    raw = solve_model(model, time_limit=time_limit, threads=threads)
    seconds = time.perf_counter() - t0
    log.debug("%s: %s in %.3f s (objective %s, bound %s)", backend, raw.status, seconds, raw.objective, raw.bound)
    if raw.status == "infeasible":
        raise explain_infeasible(problem, pairs, solve_model=solve_model if explain else None, time_limit=time_limit)
    if raw.status not in ("optimal", "feasible"):
        raise SolverFailure(f"{backend} stopped without a solution ({raw.info or raw.status}); "
                            f"raise the time limit (was {time_limit} s)")
    chosen = tuple(sorted((kept[i] for i in raw.chosen), key=lambda i: problem.candidates[i].layers[0]))
    totals, checks = verify(problem, chosen, reported_objective=raw.objective)
    return Solution(problem=problem, chosen=chosen, totals=totals, checks=tuple(checks), backend=backend,
                    status=raw.status, gap=raw.gap, seconds=seconds)
