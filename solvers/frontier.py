"""Frontiers: solve over a grid of targets on one budget axis and tabulate the optima.

Axes are budget fields: ``throughput`` (tokens/s), ``speedup`` (x), ``memory`` (bytes),
``latency`` (ms), ``params``. Without explicit targets the grid spans from what the unconstrained
optimum already achieves to the best achievable value on that axis (ignoring the other
constraints, so the last points may be infeasible; they are kept, marked ``infeasible``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from solvers.backends import DEFAULT_BACKEND, solve
from solvers.constraints import Budget
from solvers.diagnose import cover_extreme
from solvers.errors import InfeasibleError, ProblemError
from solvers.problem import Problem

AXES = {"throughput": "throughput", "speedup": "speedup", "memory": "memory_bytes",
        "latency": "latency_ms", "params": "max_params"}
COLUMNS = ["target", "status", "objective", "throughput", "speedup", "step_ms", "memory_gib", "params",
           "seconds", "reason"]


def default_targets(problem: Problem, axis: str, *, points: int = 8, backend: str = DEFAULT_BACKEND) -> list[float]:
    """``points`` evenly spaced targets between the unconstrained optimum's value and the best achievable, ascending."""
    field = _field(axis)
    free = solve(problem.with_budget(**{field: None}), backend)
    (con,) = Budget(**{field: 1.0}).constraints()
    row = con.compile(problem)
    best = con.from_lhs(problem, cover_extreme(problem, row.coefs))  # every axis row is a "<=" row
    start = con.measure(problem, free.chosen)
    return sorted(float(v) for v in np.linspace(start, best, points))


def _field(axis: str) -> str:
    if axis not in AXES:
        raise ProblemError(f"unknown frontier axis {axis!r}; axes: {sorted(AXES)}")
    return AXES[axis]


def frontier(problem: Problem, *, axis: str = "throughput", targets: Sequence[float] | None = None,
             points: int = 8, backend: str = DEFAULT_BACKEND, time_limit: float | None = None,
             progress: bool = False) -> pd.DataFrame:
    """One row per target: the optimum's objective and totals, or ``infeasible`` and why.

    ``progress`` shows a tqdm bar on a terminal (none when stderr is not a TTY).
    """
    from tqdm import tqdm

    field = _field(axis)
    if targets is None:
        targets = default_targets(problem, axis, points=points, backend=backend)
    rows = []
    for target in tqdm(targets, desc=f"frontier ({axis})", unit="solve", disable=None if progress else True):
        t0 = time.perf_counter()
        try:
            sol = solve(problem.with_budget(**{field: float(target)}), backend, time_limit=time_limit, explain=False)
        except InfeasibleError as e:
            rows.append({"target": target, "status": "infeasible", "objective": math.nan,
                         "seconds": time.perf_counter() - t0, "reason": str(e)})
            continue
        t = sol.totals
        rows.append({"target": target, "status": sol.status, "objective": sol.objective,
                     "throughput": t.throughput, "speedup": t.speedup, "step_ms": t.step_ms,
                     "memory_gib": None if t.memory_bytes is None else t.memory_bytes / 2**30,
                     "params": t.params, "seconds": time.perf_counter() - t0, "reason": ""})
    return pd.DataFrame(rows, columns=COLUMNS)
