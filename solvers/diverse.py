"""Several good solutions that differ: each new one changes at least a fraction of the layers.

Solution ``k + 1`` is the optimum of the problem plus, for each earlier solution ``j``, the row
"the candidates of ``j`` cover at most ``L - d`` layers" (:class:`solvers.constraints.Differs`),
``d = max(1, ceil(min_fraction * L))``. The rows stay in each returned solution's problem, so its
verification checks them too.
"""

from __future__ import annotations

import math

from solvers.backends import DEFAULT_BACKEND, solve
from solvers.constraints import Differs
from solvers.errors import InfeasibleError
from solvers.problem import Problem
from solvers.solution import Solution


def diverse_solutions(problem: Problem, k: int, *, min_fraction: float = 0.1, backend: str = DEFAULT_BACKEND,
                      time_limit: float | None = None, progress: bool = False) -> list[Solution]:
    """Up to ``k`` solutions, best first; fewer when no further different solution is feasible.

    The first is the plain optimum (its :class:`InfeasibleError` propagates: never an empty list).
    ``progress`` shows a tqdm bar on a terminal (none when stderr is not a TTY).
    """
    from tqdm import tqdm

    if k < 1 or not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"need k >= 1 and 0 <= min_fraction <= 1, got k={k}, min_fraction={min_fraction}")
    min_layers = max(1, math.ceil(min_fraction * problem.num_layers - 1e-9))
    with tqdm(total=k, desc="solutions", unit="solve", disable=None if progress and k > 1 else True) as bar:
        out = [solve(problem, backend, time_limit=time_limit)]
        bar.update()
        rows: list[Differs] = []
        while len(out) < k:
            rows.append(Differs(out[-1].chosen, min_layers, f"solution {len(out)}"))
            try:
                out.append(solve(problem.with_constraints(*rows), backend, time_limit=time_limit, explain=False))
            except InfeasibleError:
                break
            bar.update()
    return out
