"""``Plan``: a resolved search, read-only; every stage receives it.

    from puzzle.search import SearchConfig, resolve
    plan = resolve(SearchConfig(budget="8xH100", speedup=1.5))
    plan.target                        # Target: 8 H100s, tensor parallelism 1 (SmolLM2's 9 heads), 8 replicas, bf16
    plan.value("gkd_steps")            # 16 (from the quick preset); plan.settings["gkd_steps"].source == "preset"
    GKDSettings.of(plan).gkd_steps     # the same, typed: what the gkd stage reads
    plan.limits                        # the MIP's budget: speedup >= 1.5 in plan.budget_scenario
    plan.feasibility                   # the analytic best the search space can reach on the target
    plan.resources                     # every stage's memory, disk and time on every rank

A :class:`SearchConfig` holds what the user said; the plan holds every setting with its value and
where it came from (``default``, ``preset``, ``derived`` from the target or the cluster, ``file``,
``flag`` or ``keyword``), the deployment target parsed once (accelerator, count, tensor-parallel
degree, replicas, dtype), the serving scenarios the profiler costs and the MIP constrains (one type,
:class:`solvers.Scenario`), the MIP's limits, whether they are reachable at all, and the resource
plan. :func:`puzzle.search.resolver.resolve` makes it; nothing downstream parses a flag or a hardware
string again. Stages read their typed section of it (:class:`puzzle.search.setting.Section`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from puzzle.errors import InfeasibleBudgetError
from puzzle.search.config import SearchConfig
from puzzle.search.resources import ResourcePlan


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str
    """``default``, ``preset``, ``derived``, ``file``, ``flag`` or ``keyword``."""


@dataclass(frozen=True, kw_only=True)
class Feasibility:
    """The analytic extremes of the search space on the target, in the budget's scenario."""

    parent_ms: float
    best_ms: float
    """Step time of the fastest child the search space holds (every layer's cheapest variant)."""
    max_speedup: float
    max_throughput: float
    """Tokens/s of the whole target (all replicas) for that fastest child."""
    min_memory_gib: float
    """GiB per device of the smallest child (weights + KV cache)."""
    parent_memory_gib: float
    problems: tuple[str, ...] = ()
    """One sentence per budget that cannot be met; empty when every budget is reachable."""
    approximate: bool = False
    """True on a calibrated target: the costs are refitted after the profile stage."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"parent_ms": self.parent_ms, "best_ms": self.best_ms, "max_speedup": self.max_speedup,
                "max_throughput": self.max_throughput, "min_memory_gib": self.min_memory_gib,
                "parent_memory_gib": self.parent_memory_gib, "feasible": self.ok, "problems": list(self.problems),
                "approximate": self.approximate}


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A resolved search: every setting, the target, the scenarios, the MIP's limits, the resources. Read-only."""

    config: SearchConfig
    """What the user said."""
    settings: Mapping[str, Setting]
    """Every setting's value and where it came from, in the settings table's order."""
    target: Any
    """The deployment hardware (:class:`puzzle.profiler.hardware.Target`), not to be confused with :attr:`limits`."""
    scenarios: tuple[Any, ...]
    """Serving steps the profiler costs and the evaluation times (:class:`solvers.Scenario`); the budget's first."""
    limits: Any
    """The MIP's budget (:class:`solvers.Budget`): speedup, throughput, memory per device."""
    feasibility: Feasibility
    parent: Mapping[str, Any] = field(default_factory=dict)
    """The parent's shape: layers, hidden size, heads, parameters."""
    parent_config: Any = None
    """The parent's runtime config (:class:`puzzle.model.PuzzleConfig`), read from config.json or a shape name."""
    cluster: Any = None
    """The machines that run the search (:class:`puzzle.search.cluster.Cluster`), not the deployment target."""
    resources: ResourcePlan | None = None
    """Memory, disk and time of every stage on every rank."""
    notes: tuple[str, ...] = ()
    """A line for every value the resolver changed from what a preset or default said (why), printed under the plan."""

    def value(self, name: str) -> Any:
        """Setting ``name``'s resolved value (stages read theirs through a typed section)."""
        try:
            return self.settings[name].value
        except KeyError:
            raise KeyError(f"the plan has no setting {name!r}") from None

    @property
    def model(self) -> str:
        """The parent as the user named it (an embedded name, a directory, a shape name)."""
        return str(self.value("model"))

    @property
    def data(self) -> tuple[str, ...]:
        """The corpus every stage reads."""
        return tuple(self.value("data"))

    @property
    def engine(self) -> str:
        """The serving engine the child must load in."""
        return str(self.value("engine"))

    @property
    def budget_scenario(self) -> Any:
        """The scenario the speedup / throughput / memory budget is about."""
        return self.scenarios[0]

    def values(self) -> dict[str, Any]:
        """Every setting's resolved value, JSON-able (tuples as lists)."""
        return {k: list(s.value) if isinstance(s.value, tuple) else s.value for k, s in self.settings.items()}

    def to_dict(self) -> dict[str, Any]:
        from puzzle import __version__

        return {
            "puzzle": __version__,
            "settings": {k: {"value": v, "source": self.settings[k].source} for k, v in self.values().items()},
            "target": self.target.to_dict(),
            "scenarios": [sc.to_dict() for sc in self.scenarios],
            "limits": {"speedup": self.limits.speedup, "throughput": self.limits.throughput,
                       "memory_gib": None if self.limits.memory_bytes is None else self.limits.memory_bytes / 2**30},
            "feasibility": self.feasibility.to_dict(),
            "parent": dict(self.parent),
            "resources": self.resources.to_dict() if self.resources is not None else None,
            "notes": list(self.notes),
        }

    def budget_text(self) -> str:
        """``speedup >= 1.5x, memory <= 20 GiB/device in decode (batch 8, length 1024) on 8xH100-SXM:tp1:bf16``."""
        parts = []
        limits = self.limits
        if limits.speedup is not None:
            parts.append(f"speedup >= {limits.speedup:g}x")
        if limits.throughput is not None:
            parts.append(f"throughput >= {limits.throughput:g} tokens/s")
        if limits.memory_bytes is not None:
            parts.append(f"memory <= {limits.memory_bytes / 2**30:g} GiB/device")
        sc = self.budget_scenario
        return f"{', '.join(parts)} in {sc.phase} (batch {sc.batch}, length {sc.length}) on {self.target.name}"


def search_space(space: Mapping[str, Any] | None, engine: str | None) -> Any:
    """The :class:`block_library.space.SearchSpace` of a ``space`` setting, kept to what ``engine`` loads."""
    from block_library.space import SearchSpace

    return dataclasses.replace(SearchSpace.from_dict(space), engine=engine)


def plan_space(plan: Plan) -> Any:
    """The plan's search space: its ``space`` setting, kept to what its ``engine`` loads."""
    return search_space(plan.value("space"), plan.engine)


def check_feasible(plan: Plan) -> None:
    """:class:`InfeasibleBudgetError` naming the first unreachable budget and the best reachable value.

    Each bound alone, against the analytic extreme of the search space (:attr:`Plan.feasibility`); the
    bounds together and with the custom constraints are solved for in
    :func:`puzzle.search.constraints_check.check_constraints`."""
    if plan.feasibility.problems:
        raise InfeasibleBudgetError(plan.feasibility.problems[0])
