"""The compiled form every backend solves: binary ``x_c`` per candidate, exact cover, linear rows.

    minimize    sum_c objective[c] * x_c
    subject to  sum_{c covers layer l} x_c == 1                for every layer l
                sum_c row.coefs[c] * x_c  (<= | >= | ==)  row.rhs   for every row
                x_c in {0, 1}

Backends read a :class:`Model` and return a :class:`RawResult`; they never see tables, budgets
or constraint objects, so each stays a short translation into its solver's API.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

SENSES = ("<=", ">=", "==")


@dataclass(frozen=True)
class LinearConstraint:
    """One row ``sum_c coefs[c] * x_c (sense) rhs``; ``coefs`` maps candidate index to coefficient."""

    name: str
    coefs: dict[int, float]
    sense: str
    rhs: float

    def __post_init__(self) -> None:
        if self.sense not in SENSES:
            raise ValueError(f"sense must be one of {SENSES}, got {self.sense!r}")
        if not math.isfinite(self.rhs):
            raise ValueError(f"{self.name}: right-hand side must be finite, got {self.rhs}")


@dataclass(frozen=True)
class Model:
    """A problem in solver terms. ``cover[l]`` lists the candidates covering layer ``l``."""

    objective: tuple[float, ...]
    cover: tuple[tuple[int, ...], ...]
    rows: tuple[LinearConstraint, ...] = ()
    maximize: bool = False
    """Maximize instead of minimize (only the infeasibility diagnosis uses it)."""

    @property
    def num_candidates(self) -> int:
        return len(self.objective)


@dataclass(frozen=True)
class RawResult:
    """What a backend found, before any verification."""

    status: str
    """``optimal`` (proven), ``feasible`` (stopped early with a solution), ``infeasible``, or
    ``unknown`` (stopped without a solution or a proof)."""
    chosen: tuple[int, ...] = ()
    """Indices of the candidates with ``x_c = 1``."""
    objective: float = math.nan
    """The objective the solver reports for ``chosen``, in the model's units."""
    bound: float = math.nan
    """The solver's best bound on the objective (equal to ``objective`` when proven optimal)."""
    info: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """Relative optimality gap ``|objective - bound| / max(|objective|, 1e-12)`` from the solver's
        bound; without a bound, 0 when the solver proved optimality and NaN otherwise."""
        if math.isnan(self.bound) or math.isnan(self.objective):
            return 0.0 if self.status == "optimal" else math.nan
        return abs(self.objective - self.bound) / max(abs(self.objective), 1e-12)


def chosen_from_values(values: list[float]) -> tuple[int, ...]:
    """Round a solver's 0/1 values (solvers report 0.9999999 for 1)."""
    return tuple(i for i, v in enumerate(values) if v is not None and v > 0.5)


def prune_dominated(model: Model) -> tuple[Model, tuple[int, ...]]:
    """Drop every candidate that another one covering the same layers beats or ties everywhere.

    ``i`` dominates ``j`` when its objective and every row coefficient are at least as good (lower
    for a minimized objective and ``<=`` rows, higher for ``>=`` rows, equal for ``==`` rows), with
    ties broken by index. Swapping ``j`` for ``i`` in any feasible choice keeps it feasible and no
    worse, so an optimum survives (a presolve; exact). Returns the smaller model and, for each of
    its candidates, the index it had in ``model``.
    """
    n = model.num_candidates
    sign = -1.0 if model.maximize else 1.0
    columns = [sign * np.asarray(model.objective, dtype=float)]  # (n,) each; lower is better in all
    for row in model.rows:
        dense = np.zeros(n)
        dense[list(row.coefs)] = list(row.coefs.values())
        columns += {"<=": [dense], ">=": [-dense], "==": [dense, -dense]}[row.sense]
    values = np.stack(columns, axis=1)  # (n, d)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    layers_of: dict[int, list[int]] = defaultdict(list)
    for layer, cands in enumerate(model.cover):
        for c in cands:
            layers_of[c].append(layer)
    for c in range(n):
        groups[tuple(layers_of[c])].append(c)
    keep = []
    for members in groups.values():
        v = values[members]  # (m, d)
        no_worse = (v[:, None, :] <= v[None, :, :]).all(axis=2)  # [i, j]: i no worse than j anywhere
        better = (v[:, None, :] < v[None, :, :]).any(axis=2)
        earlier = np.arange(len(members))[:, None] < np.arange(len(members))[None, :]
        dominated = (no_worse & (better | earlier)).any(axis=0)
        keep += [c for c, d in zip(members, dominated, strict=True) if not d]
    keep.sort()
    new = {old: i for i, old in enumerate(keep)}
    rows = tuple(LinearConstraint(r.name, {new[c]: v for c, v in r.coefs.items() if c in new}, r.sense, r.rhs)
                 for r in model.rows)
    cover = tuple(tuple(new[c] for c in cands if c in new) for cands in model.cover)
    pruned = Model(objective=tuple(model.objective[c] for c in keep), cover=cover, rows=rows,
                   maximize=model.maximize)
    return pruned, tuple(keep)
