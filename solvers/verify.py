"""Trust but verify: recompute every total of a solver's choice and check each constraint.

Nothing here reads a solver's model or the compiled rows: coverage is counted from the chosen
candidates' layers, totals are summed from their cost columns (:meth:`Problem.totals`), and each
constraint is measured by its own ``measure`` (:mod:`solvers.constraints`), so a bug in a
backend, in the compilation to rows, or in a solver's tolerances surfaces as a
:class:`VerificationError` instead of a wrong architecture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from solvers.constraints import REL_TOL, Check
from solvers.errors import VerificationError
from solvers.problem import Problem, Totals


def verify(problem: Problem, chosen: Sequence[int], *,
           reported_objective: float | None = None) -> tuple[Totals, list[Check]]:
    """Return the recomputed totals and one :class:`Check` per constraint; raise on any failure."""
    failures: list[str] = []
    n = len(problem.candidates)
    bad = [i for i in chosen if not (isinstance(i, int) and 0 <= i < n)]
    if bad:
        raise VerificationError(f"chosen indices {bad[:5]} are not candidates (0..{n - 1})")
    covered = [0] * problem.num_layers
    for i in chosen:
        for layer in problem.candidates[i].layers:
            covered[layer] += 1
    wrong = [(layer, k) for layer, k in enumerate(covered) if k != 1]
    if wrong:
        failures.append("every layer must be covered exactly once; (layer, times covered): " + str(wrong[:10]))
    totals = problem.totals(chosen)
    if reported_objective is not None:
        tol = REL_TOL * max(1.0, abs(totals.objective))
        if not math.isclose(totals.objective, reported_objective, rel_tol=0.0, abs_tol=tol):
            failures.append(f"the solver reports objective {reported_objective:.9g} but the chosen "
                            f"candidates sum to {totals.objective:.9g}")
    checks = [c.check(problem, chosen) for c in problem.all_constraints()]
    for c in checks:
        if not c.ok:
            failures.append(f"{c.name} is violated: the chosen candidates give {c.shown} ({c.value:.9g})")
    if failures:
        raise VerificationError("the solution fails verification: " + "; ".join(failures))
    return totals, checks
