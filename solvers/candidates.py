"""The candidates of a search, and the totals of a choice among them.

A :class:`Candidate` is one block variant for one layer, or for a run of consecutive layers (a
fused FFN run, say); a choice picks candidates so that every layer is covered exactly once. The
quality loss of a choice is the sum of its candidates' scores in one score column, and every
total the budget talks about is a sum over the chosen candidates plus the fixed costs
(embedding, LM head, per-step overhead)::

    memory     = sum weight_bytes + sum kv_bytes_per_token * batch * kv_tokens + fixed   bytes per device
    step_ms    = sum <scenario>_ms + fixed <scenario>_ms              one step of one replica
    throughput = replicas * batch * new_tokens * 1000 / step_ms       tokens/s of the whole target
    speedup    = parent step_ms / step_ms         parent = the is_parent candidate of every layer
    params     = sum params + fixed params

with the :class:`~solvers.scenario.Scenario`'s sizes: ``new_tokens`` is the prompt length (prefill)
or 1 (decode); ``kv_tokens`` is the prompt length (prefill) or the cache length + 1 (decode).
Memory is per device: each replica holds its own weights and cache, so ``replicas`` multiplies
throughput only (and leaves the speedup, a ratio of step times, alone).

A :class:`Catalog` holds the candidates, the score column and the scenario, and computes those totals; the
budget's constraints (:mod:`solvers.constraints`) read it, and :class:`~solvers.problem.Problem` is a catalog
with a budget and custom constraints.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

from solvers.errors import ProblemError
from solvers.labels import label_attributes
from solvers.scenario import Scenario

WEIGHT_BYTES, KV_BYTES, PARAMS = "weight_bytes", "kv_bytes_per_token", "params"

_C = TypeVar("_C", bound="Catalog")


@dataclass(frozen=True, kw_only=True, eq=False)
class Candidate:
    """One block variant covering one layer or a run of consecutive layers."""

    id: str
    """Unique name, e.g. ``3:gqa:8|swiglu:14336`` or ``4-7:no_op|swiglu:4096+...``."""
    layers: tuple[int, ...]
    """The consecutive layers it covers, ascending."""
    members: tuple[str, ...]
    """One block label per covered layer (``gqa:3|swiglu:1536``; see :mod:`solvers.labels`)."""
    costs: Mapping[str, float] = field(default_factory=dict)
    """Cost columns: ``params``, ``weight_bytes``, ``kv_bytes_per_token``, ``<scenario>_ms``, ..."""
    scores: Mapping[str, float] = field(default_factory=dict)
    """Quality loss per score column (lower is better): ``kl``, ``loss_delta``, ..."""
    attrs: Mapping[str, Any] = field(default_factory=dict)
    """Candidate-level attributes: ``is_parent`` and any extra table columns."""

    def __post_init__(self) -> None:
        layers = tuple(int(x) for x in self.layers)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "members", tuple(self.members))
        if not layers or layers[0] < 0 or layers != tuple(range(layers[0], layers[0] + len(layers))):
            raise ProblemError(f"candidate {self.id}: layers must be consecutive and >= 0, got {layers}")
        if len(self.members) != len(layers):
            raise ProblemError(f"candidate {self.id}: {len(layers)} layers but {len(self.members)} member labels")
        for label in self.members:
            label_attributes(label)  # raises on a malformed label

    @property
    def variant(self) -> str:
        return "+".join(self.members)

    @property
    def is_parent(self) -> bool:
        return bool(self.attrs.get("is_parent", False))

    def member_attributes(self, layer: int) -> dict[str, Any]:
        """Everything a custom constraint can test at ``layer`` (one of :attr:`layers`)."""
        out = dict(self.costs)
        out.update(self.scores)
        out.update(self.attrs)
        out.update(label_attributes(self.members[layer - self.layers[0]]))
        out.update(layer=layer, span=len(self.layers), is_parent=self.is_parent)
        return out


@dataclass(frozen=True)
class Totals:
    """Every total of a choice, recomputed from its candidates (``None`` where a column is absent)."""

    objective: float
    params: float | None
    weight_bytes: float | None
    kv_cache_bytes: float | None
    memory_bytes: float | None
    step_ms: float | None
    throughput: float | None
    parent_step_ms: float | None
    speedup: float | None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.memory_bytes is not None:
            out["memory_gib"] = self.memory_bytes / 2**30
        return out


@dataclass(frozen=True, kw_only=True, eq=False)
class Catalog:
    """Candidates, the score column to minimize and a scenario: everything a choice is measured by, and its
    totals. :class:`~solvers.problem.Problem` adds what limits a choice (the budget, custom constraints)."""

    candidates: tuple[Candidate, ...]
    score_column: str
    """Which score column the objective sums."""
    scenario: Scenario = field(default_factory=Scenario)
    """The latency column, the KV-cache tokens memory counts, and the tokens per step throughput counts."""
    fixed: Mapping[str, float] = field(default_factory=dict)
    """Costs that every choice pays (embedding, LM head, per-step overhead), by cost column."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if not isinstance(self.scenario, Scenario):
            raise ProblemError(f"scenario must be a solvers.Scenario, got {type(self.scenario).__name__}")
        repeated = sorted(i for i, n in Counter(c.id for c in self.candidates).items() if n > 1)
        if repeated:
            raise ProblemError(f"candidate ids must be unique; repeated: {repeated[:5]}")
        if not self.candidates:
            raise ProblemError("a problem needs at least one candidate")
        missing = [c.id for c in self.candidates if self.score_column not in c.scores]
        if missing:
            available = sorted(set().union(*(c.scores for c in self.candidates)))
            raise ProblemError(f"score column {self.score_column!r} is missing (first: {missing[0]}); "
                               f"available score columns: {available}")
        uncovered = [layer for layer, cands in enumerate(self.cover) if not cands]
        if uncovered:
            raise ProblemError(f"layers {uncovered[:10]} have no candidate; "
                               f"every layer 0..{self.num_layers - 1} needs one")

    # -- structure -------------------------------------------------------------------------------
    @cached_property
    def num_layers(self) -> int:
        return 1 + max(c.layers[-1] for c in self.candidates)

    @cached_property
    def cover(self) -> tuple[tuple[int, ...], ...]:
        """``cover[l]``: indices of the candidates that cover layer ``l``."""
        out: list[list[int]] = [[] for _ in range(self.num_layers)]
        for i, c in enumerate(self.candidates):
            for layer in c.layers:
                out[layer].append(i)
        return tuple(tuple(x) for x in out)

    @cached_property
    def attribute_values(self) -> dict[str, set]:
        """Every attribute custom constraints can test, with the values the candidates have."""
        seen: dict[str, set] = {}
        for c in self.candidates:
            for layer in c.layers:
                for k, v in c.member_attributes(layer).items():
                    seen.setdefault(k, set()).add(v)
        return seen

    def replace(self: _C, **changes: Any) -> _C:
        return dataclasses.replace(self, **changes)

    # -- columns ---------------------------------------------------------------------------------
    @cached_property
    def _columns(self) -> dict[str, tuple[float, ...] | None]:
        return {}  # column name -> values (None: not a column of every candidate)

    def _lookup(self, name: str) -> tuple[float, ...] | None:
        if name not in self._columns:
            try:
                self._columns[name] = tuple(float(c.costs[name]) if name in c.costs else float(c.scores[name])
                                            for c in self.candidates)
            except KeyError:
                self._columns[name] = None
        return self._columns[name]

    def column(self, name: str) -> tuple[float, ...]:
        """Per-candidate values of a cost or score column; :class:`ProblemError` names the columns there are."""
        values = self._lookup(name)
        if values is None:
            costs = sorted(set().union(*(c.costs for c in self.candidates)))
            scores = sorted(set().union(*(c.scores for c in self.candidates)))
            raise ProblemError(f"no column {name!r} (for every candidate); cost columns: {costs}; "
                               f"score columns: {scores}")
        return values

    @cached_property
    def latency_column(self) -> str:
        """The scenario's latency column: ``<name>_ms``, or ``<name>`` when that is a cost column."""
        name = self.scenario.name
        have = set.intersection(*(set(c.costs) for c in self.candidates))
        for col in (f"{name}_ms", name):
            if col in have:
                return col
        raise ProblemError(f"scenario {name!r}: no latency column {name + '_ms'!r}; latency columns: "
                           f"{sorted(c for c in have if c.endswith('_ms'))}")

    def has_columns(self, *names: str) -> bool:
        return all(self._lookup(n) is not None for n in names)

    @cached_property
    def parent(self) -> tuple[int, ...]:
        """Indices of the parent's candidates (``is_parent``), one single-layer candidate per layer."""
        found = [[i for i in cands if self.candidates[i].is_parent] for cands in self.cover]
        bad = [layer for layer, f in enumerate(found) if len(f) != 1 or len(self.candidates[f[0]].layers) != 1]
        if bad:
            raise ProblemError(f"the parent needs exactly one single-layer is_parent candidate per layer; "
                               f"layers {bad[:10]} have {[len(found[b]) for b in bad[:10]]}")
        return tuple(f[0] for f in found)

    # -- totals of a choice ----------------------------------------------------------------------
    def sum_of(self, name: str, chosen: Iterable[int], *, with_fixed: bool = True) -> float:
        """Sum of a column over the chosen candidates (plus its fixed cost)."""
        col = self.column(name)
        return sum(col[i] for i in chosen) + (self.fixed.get(name, 0.0) if with_fixed else 0.0)

    def totals(self, chosen: Sequence[int]) -> Totals:
        """Every total of a choice, from the candidates' own costs (no solver involved)."""
        s = self.scenario
        objective = self.sum_of(self.score_column, chosen, with_fixed=False)
        params = self.sum_of(PARAMS, chosen) if self.has_columns(PARAMS) else None
        weight = kv = memory = None
        if self.has_columns(WEIGHT_BYTES, KV_BYTES):
            weight = self.sum_of(WEIGHT_BYTES, chosen)
            kv = self.sum_of(KV_BYTES, chosen) * s.cache_tokens  # batch * kv_tokens, per device
            memory = weight + kv
        step = throughput = parent_step = speedup = None
        try:
            step = self.sum_of(self.latency_column, chosen)
        except ProblemError:
            pass
        if step is not None:
            throughput = s.throughput(step)  # replicas * batch * new_tokens * 1000 / step
            if any(c.is_parent for c in self.candidates):
                parent_step = self.sum_of(self.latency_column, self.parent)
                speedup = parent_step / step if step > 0 else float("inf")
        return Totals(objective=objective, params=params, weight_bytes=weight, kv_cache_bytes=kv,
                      memory_bytes=memory, step_ms=step, throughput=throughput,
                      parent_step_ms=parent_step, speedup=speedup)

