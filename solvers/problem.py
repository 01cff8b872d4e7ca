"""The search problem: a :class:`~solvers.candidates.Catalog` of candidates with a budget and custom constraints.

Candidates, columns and the totals of a choice are in :mod:`solvers.candidates` (re-exported here); what limits a
choice is in :mod:`solvers.constraints` (the budget's) and :mod:`solvers.expressions` (custom ones).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from solvers.candidates import KV_BYTES, PARAMS, WEIGHT_BYTES, Candidate, Catalog, Totals
from solvers.constraints import Budget, Constraint
from solvers.model import LinearConstraint, Model

__all__ = ["KV_BYTES", "PARAMS", "WEIGHT_BYTES", "Candidate", "Catalog", "Problem", "Totals"]


@dataclass(frozen=True, kw_only=True, eq=False)
class Problem(Catalog):
    """Candidates, the score column to minimize, a scenario, a budget and custom constraints."""

    budget: Budget = field(default_factory=Budget)
    constraints: tuple[Constraint, ...] = ()
    """Custom constraints (see :mod:`solvers.expressions`), on top of the budget's."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "constraints", tuple(self.constraints))
        super().__post_init__()

    def with_budget(self, **changes: Any) -> Problem:
        """A copy with some budget fields changed, e.g. ``with_budget(throughput=2000.0)``."""
        return self.replace(budget=dataclasses.replace(self.budget, **changes))

    def with_constraints(self, *constraints: Constraint) -> Problem:
        """A copy with ``constraints`` added to the custom ones."""
        return self.replace(constraints=self.constraints + tuple(constraints))

    def all_constraints(self) -> list[Constraint]:
        return [*self.budget.constraints(), *self.constraints]

    # -- compiled form ---------------------------------------------------------------------------
    def compile(self) -> tuple[Model, list[tuple[Constraint, LinearConstraint]]]:
        """The :class:`Model` backends solve, and each constraint next to its compiled row."""
        pairs = [(c, c.compile(self)) for c in self.all_constraints()]
        model = Model(objective=tuple(self.column(self.score_column)), cover=self.cover,
                      rows=tuple(row for _, row in pairs))
        return model, pairs
