"""Typed errors of the solvers package.

``solvers`` never imports ``puzzle`` (it must stay torch-free), so these classes do not derive
from ``puzzle.errors.PuzzleError``; the CLI (``puzzle/cli/solve_cmd.py``) re-raises them as
PuzzleError subclasses. Each derives from the builtin a caller would naturally catch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class SolverError(Exception):
    """Base class of every error ``solvers`` raises on purpose."""


class ProblemError(SolverError, ValueError):
    """A problem is malformed: a layer nobody covers, an unknown column, a bad constraint."""


class TableError(ProblemError):
    """A scores or costs table is missing, unreadable, or not in the documented format."""


class ConstraintSyntaxError(ProblemError):
    """A constraint written as text does not parse; the message gives the position."""


class InfeasibleError(SolverError, ValueError):
    """No choice of candidates meets the budget and constraints.

    ``diagnosis`` maps each constraint's name to ``{"sense", "requested", "best", "alone"}``:
    the requested value, the best value achievable (alone: ignoring every other constraint;
    otherwise: subject to the others) in the constraint's own units, and whether the
    constraint is infeasible on its own. The message says the same in words.
    """

    def __init__(self, reason: str, *, diagnosis: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.diagnosis: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (diagnosis or {}).items()}


class VerificationError(SolverError, RuntimeError):
    """A solver's answer fails the independent recomputation of totals and constraints."""


class SolverFailure(SolverError, RuntimeError):
    """A solver stopped without a usable answer (time limit without a solution, unknown status)."""
