"""Constraints: the budget's (memory, throughput, speedup, latency, parameters) and diversity.

Every constraint has two halves that never share code:

* ``compile(problem)`` turns it into one linear row over the candidates (what solvers see).
  Throughput and speedup are not linear in the choice, but their bounds are: ``replicas * batch *
  new_tokens * 1000 / step_ms >= target`` is ``sum latency_ms <= 1000 * replicas * batch *
  new_tokens / target - fixed_ms`` (see :class:`solvers.scenario.Scenario`).
* ``measure(problem, chosen)`` recomputes its quantity from the chosen candidates' own costs, in
  the user's units (bytes, tokens/s, x, ms, parameters). Verification uses only this half.

A constraint reads only the :class:`~solvers.candidates.Catalog` part of a problem (candidates, columns, totals),
so that :class:`~solvers.problem.Problem` can hold a budget of constraints. Custom constraints
(``count(attention != "no_op") >= 8``, ...) live in :mod:`solvers.expressions`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from solvers.candidates import KV_BYTES, PARAMS, WEIGHT_BYTES, Catalog
from solvers.errors import ProblemError
from solvers.model import LinearConstraint

REL_TOL = 1e-6
"""A constraint counts as met when it holds within this fraction of its target (solvers' own tolerance)."""


@dataclass(frozen=True)
class Check:
    """One constraint checked on a choice: its recomputed value against its target."""

    name: str
    value: float
    sense: str
    target: float
    slack: float
    """``target - value`` for ``<=``, ``value - target`` for ``>=``, ``-|value - target|`` for ``==``."""
    ok: bool
    shown: str = ""
    """``value`` in the constraint's units, for people (``71.250 GiB``, ``2140.5 tokens/s``)."""
    shown_slack: str = ""


class Constraint(ABC):
    """A constraint on a choice of candidates."""

    sense: str
    """``<=``, ``>=`` or ``==``, between :meth:`measure` and :attr:`target`."""
    target: float
    quantity: str = "value"
    """What :meth:`measure` returns, in words (``memory``, ``throughput``, ...)."""

    @property
    @abstractmethod
    def name(self) -> str:
        """Readable and unique within a problem, e.g. ``memory <= 80.00 GiB``."""

    @abstractmethod
    def compile(self, problem: Catalog) -> LinearConstraint:
        """The linear row ``sum_c coef_c x_c (sense) rhs`` that solvers see."""

    @abstractmethod
    def measure(self, problem: Catalog, chosen: Sequence[int]) -> float:
        """The constrained quantity of a choice, recomputed from the candidates (not from the row)."""

    def from_lhs(self, problem: Catalog, lhs: float) -> float:
        """The quantity for a value of the compiled row's left-hand side (for diagnoses)."""
        return lhs

    def format(self, value: float) -> str:
        return f"{value:.6g}"

    def check(self, problem: Catalog, chosen: Sequence[int]) -> Check:
        value = self.measure(problem, chosen)
        # + 0.0 turns the -0.0 of an exact equality into 0.0
        slack = {"<=": self.target - value, ">=": value - self.target,
                 "==": -abs(value - self.target) + 0.0}[self.sense]
        ok = slack >= -REL_TOL * max(1.0, abs(self.target))
        return Check(name=self.name, value=value, sense=self.sense, target=self.target, slack=slack, ok=ok,
                     shown=self.format(value), shown_slack=self.format(slack))


def format_bytes(value: float) -> str:
    """``85899345920`` -> ``80.000 GiB`` (KiB, MiB, GiB or TiB; plain bytes below 1 KiB)."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.3f} {unit}"
    return f"{value:g} bytes"


def _fixed(problem: Catalog, column: str) -> float:
    return float(problem.fixed.get(column, 0.0))


def _require(problem: Catalog, what: str, *columns: str) -> None:
    if not problem.has_columns(*columns):
        for col in columns:
            problem.column(col)  # raises, naming the columns there are
        raise ProblemError(f"{what} needs the cost columns {list(columns)}")


@dataclass(frozen=True)
class Bound(Constraint):
    """A budget's bound on one total of a choice (a field of :class:`~solvers.candidates.Totals`), named
    ``<label> <sense> <target>`` and shown in its unit."""

    target: float
    label: ClassVar[str]
    """The name's first word(s): ``memory``, ``step time``, ..."""
    total: ClassVar[str]
    """The :class:`~solvers.candidates.Totals` field that :meth:`measure` reads."""
    unit: ClassVar[str] = "{:.6g}"
    """How a value is shown, as a format string: ``"{:.4g} ms"``."""

    @property
    def name(self) -> str:
        return f"{self.label} {self.sense} {self.format(self.target)}"

    def measure(self, problem: Catalog, chosen: Sequence[int]) -> float:
        return getattr(problem.totals(chosen), self.total)

    def format(self, value: float) -> str:
        return self.unit.format(value)


@dataclass(frozen=True)
class MemoryLimit(Bound):
    """Weights + KV cache (scenario batch x kv_tokens) + fixed bytes <= ``target`` bytes, per device."""

    sense = "<="
    quantity = label = "memory"
    total = "memory_bytes"

    def compile(self, problem: Catalog) -> LinearConstraint:
        _require(problem, "a memory budget", WEIGHT_BYTES, KV_BYTES)
        per_token = problem.scenario.cache_tokens  # batch * kv_tokens: replicas do not share a device
        weights, kv = problem.column(WEIGHT_BYTES), problem.column(KV_BYTES)
        coefs = [w + k * per_token for w, k in zip(weights, kv, strict=True)]
        rhs = self.target - self.from_lhs(problem, 0.0)
        return LinearConstraint(self.name, dict(enumerate(coefs)), "<=", rhs)

    def from_lhs(self, problem: Catalog, lhs: float) -> float:
        per_token = problem.scenario.cache_tokens
        return lhs + _fixed(problem, WEIGHT_BYTES) + _fixed(problem, KV_BYTES) * per_token

    def format(self, value: float) -> str:
        return format_bytes(value)


@dataclass(frozen=True)
class StepTimeBound(Bound):
    """A bound on a total that is a monotone function of the step time: the step time itself, the throughput or the
    speedup. Its row is always ``sum latency <= max step time - fixed``; a subclass says how its quantity and the
    step time convert (:meth:`max_step_ms`, :meth:`of_step`)."""

    def max_step_ms(self, problem: Catalog) -> float:
        """The longest step time (ms) that meets the target."""
        raise NotImplementedError

    def of_step(self, problem: Catalog, step_ms: float) -> float:
        """The quantity at a step time (ms)."""
        raise NotImplementedError

    def compile(self, problem: Catalog) -> LinearConstraint:
        col = problem.latency_column
        rhs = self.max_step_ms(problem) - _fixed(problem, col)
        return LinearConstraint(self.name, dict(enumerate(problem.column(col))), "<=", rhs)

    def from_lhs(self, problem: Catalog, lhs: float) -> float:
        return self.of_step(problem, lhs + _fixed(problem, problem.latency_column))


@dataclass(frozen=True)
class LatencyLimit(StepTimeBound):
    """Step time (summed latency + fixed) <= ``target`` ms."""

    sense = "<="
    quantity = label = "step time"
    total = "step_ms"
    unit = "{:.4g} ms"

    def max_step_ms(self, problem: Catalog) -> float:
        return self.target

    def of_step(self, problem: Catalog, step_ms: float) -> float:
        return step_ms


@dataclass(frozen=True)
class RateTarget(StepTimeBound):
    """``work / step time >= target``: the throughput (tokens per step) or the speedup (the parent's step time). It
    is the bound ``step time <= work / target``."""

    sense = ">="

    def work(self, problem: Catalog) -> float:
        """What is done per step, in the quantity's units times ms."""
        raise NotImplementedError

    def max_step_ms(self, problem: Catalog) -> float:
        if self.target <= 0:
            raise ProblemError(f"{self.quantity} target must be positive, got {self.target}")
        return self.work(problem) / self.target

    def of_step(self, problem: Catalog, step_ms: float) -> float:
        return self.work(problem) / step_ms if step_ms > 0 else math.inf


@dataclass(frozen=True)
class ThroughputTarget(RateTarget):
    """``replicas * batch * new_tokens / step time`` >= ``target`` tokens/s (the whole target)."""

    quantity = label = total = "throughput"
    unit = "{:.6g} tokens/s"

    def work(self, problem: Catalog) -> float:
        return problem.scenario.node_tokens * 1000.0  # as Scenario.throughput: tokens per step, ms to s


@dataclass(frozen=True)
class SpeedupTarget(RateTarget):
    """Parent step time / step time >= ``target``."""

    quantity = label = total = "speedup"
    unit = "{:.4f}x"

    def work(self, problem: Catalog) -> float:
        return problem.sum_of(problem.latency_column, problem.parent)


@dataclass(frozen=True)
class ParamsLimit(Bound):
    """Parameters (chosen + fixed) <= ``target``."""

    sense = "<="
    quantity = "parameter count"
    label = total = "params"

    def compile(self, problem: Catalog) -> LinearConstraint:
        _require(problem, "a parameter budget", PARAMS)
        return LinearConstraint(self.name, dict(enumerate(problem.column(PARAMS))), "<=",
                                self.target - _fixed(problem, PARAMS))

    def from_lhs(self, problem: Catalog, lhs: float) -> float:
        return lhs + _fixed(problem, PARAMS)


@dataclass(frozen=True)
class Differs(Constraint):
    """A choice differs from an earlier one (``previous`` candidate indices) in >= ``target`` layers.

    A layer differs when the candidate covering it is not the one that covered it before.
    """

    previous: tuple[int, ...]
    target: int
    label: str = "a previous solution"
    sense = ">="
    quantity = "number of differing layers"

    @property
    def name(self) -> str:
        return f"differs from {self.label} in >= {self.target} layers"

    def compile(self, problem: Catalog) -> LinearConstraint:
        # same layers = sum over previous candidates of (layers covered) * x_c <= L - target
        coefs = {i: float(len(problem.candidates[i].layers)) for i in self.previous}
        return LinearConstraint(self.name, coefs, "<=", float(problem.num_layers - self.target))

    def measure(self, problem: Catalog, chosen: Sequence[int]) -> float:
        before = {layer: i for i in self.previous for layer in problem.candidates[i].layers}
        now = {layer: i for i in chosen for layer in problem.candidates[i].layers}
        return float(sum(before.get(layer) != now.get(layer) for layer in range(problem.num_layers)))

    def from_lhs(self, problem: Catalog, lhs: float) -> float:
        return problem.num_layers - lhs


@dataclass(frozen=True, kw_only=True)
class Budget:
    """The target's limits; ``None`` means unconstrained."""

    memory_bytes: float | None = None
    """Capacity per device for weights + KV cache (scenario batch x kv_tokens) + fixed bytes."""
    throughput: float | None = None
    """Minimum tokens/s of the whole target: ``replicas * batch * new_tokens / step time``."""
    speedup: float | None = None
    """Minimum step-time speedup over the parent."""
    latency_ms: float | None = None
    """Maximum step time in ms (summed latency + fixed)."""
    max_params: float | None = None
    """Maximum parameter count (chosen + fixed)."""

    def constraints(self) -> list[Constraint]:
        out: list[Constraint] = []
        for value, cls in ((self.memory_bytes, MemoryLimit), (self.throughput, ThroughputTarget),
                           (self.speedup, SpeedupTarget), (self.latency_ms, LatencyLimit),
                           (self.max_params, ParamsLimit)):
            if value is not None:
                out.append(cls(float(value)))
        return out
