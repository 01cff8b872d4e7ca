"""``resolve(config) -> Plan``: the one place where a search's settings get their defaults.

    from puzzle.search import SearchConfig, resolve
    plan = resolve(SearchConfig(budget="8xH100", speedup=1.5))
    plan.target            # Target: 8 H100s, tensor parallelism 1 (SmolLM2's 9 heads), 8 replicas, bf16
    plan.gkd_steps         # 16 (from the quick preset); plan.settings["gkd_steps"].source == "preset"
    plan.limits            # the MIP's budget: speedup >= 1.5 in plan.budget_scenario
    plan.feasibility       # the analytic best the search space can reach on the target

A :class:`SearchConfig` holds what the user said; the plan holds every setting with its value
and where it came from (``default``, ``preset``, ``derived`` from the target, ``file``, ``flag``
or ``keyword``), the deployment target parsed once (accelerator, count, tensor-parallel degree,
replicas, dtype), the serving scenarios the profiler costs and the MIP constrains (one type,
:class:`solvers.Scenario`), the MIP's limits, and whether they are reachable at all. Every stage
reads the plan; nothing downstream parses a flag or a hardware string again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from puzzle.errors import ConfigError, InfeasibleBudgetError
from puzzle.search.config import PRESETS, SearchConfig, settings_fields

DEFAULTS: dict[str, Any] = {
    "model": "smollm2-135m", "data": ("stdlib",), "budget": "8xH100", "scenario": "decode", "batch": 8,
    "context": 1024, "solver": "ortools-mip", "constraints": (), "baselines": (), "preset": "quick",
    "fuse_distill_steps": 100, "gkd_top_k": 64, "seed": 0, "ffn_refit": False, "throughput": None, "memory": None, "space": None, "engine": "vllm",
}
"""Plain defaults; the preset's stage sizes and the target-derived settings are filled in by :func:`resolve`."""
DEFAULT_SPEEDUP = 1.5
OTHER_PHASE_BATCH = {"prefill": 1, "decode": 8}
"""Batch of the phase the budget is not about (reported, not constrained): one prompt, or 8 sequences decoding."""
CALIBRATED_SLACK = 2.0
"""A calibrated CPU target is costed only after the profile stage fits it, so the preflight refuses a
speedup only when it is this many times beyond the uncalibrated analytic best."""


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
    """A resolved search: every setting, the target, the scenarios, the MIP's limits. Read-only.

    A setting reads as an attribute (``plan.gkd_steps``); :attr:`settings` also says where each came from.
    """

    config: SearchConfig
    """What the user said."""
    settings: Mapping[str, Setting]
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
    resources: Any = None
    """Memory, disk and time of every stage on every rank (:class:`puzzle.search.resources.ResourcePlan`)."""

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings") or {}
        if name in settings:
            return settings[name].value
        raise AttributeError(f"{type(self).__name__} has no attribute or setting {name!r}")

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
        }

    def budget_text(self) -> str:
        """``speedup >= 1.5x, memory <= 20 GiB/device in decode (batch 8, context 1024) on 8xH100-SXM:tp1:bf16``."""
        parts = []
        if self.speedup is not None:
            parts.append(f"speedup >= {self.speedup:g}x")
        if self.throughput is not None:
            parts.append(f"throughput >= {self.throughput:g} tokens/s")
        if self.memory is not None:
            parts.append(f"memory <= {self.memory:g} GiB/device")
        sc = self.budget_scenario
        return f"{', '.join(parts)} in {sc.phase} (batch {sc.batch}, length {sc.length}) on {self.target.name}"


def resolve(config: SearchConfig | None = None) -> Plan:
    """Fill in every default of ``config``, parse the target once and check the budget is reachable.

    Reads the parent's ``config.json`` (no weights), or takes a shape name (``llama-3.1-70b``), and
    plans every stage's memory and time on the cluster (:attr:`Plan.resources`). Raises a typed error for an unknown model,
    target or dtype and for an invalid ``tp``; an unreachable budget is *reported* in
    :attr:`Plan.feasibility` (:func:`check_feasible` raises it).
    """
    from puzzle.profiler.counts import ModelShape
    from puzzle.profiler.deployment import choose_tensor_parallel
    from puzzle.profiler.hardware import parse_target
    from puzzle.search.cluster import default_cluster, parse_cluster
    from puzzle.search.resources import Work, plan_resources
    from solvers import Budget, Scenario

    config = config or SearchConfig()
    settings: dict[str, Setting] = {}
    for f in settings_fields():
        if getattr(config, f.name) is not None:
            settings[f.name] = Setting(getattr(config, f.name), config.origin.get(f.name, "keyword"))
        elif f.name in DEFAULTS:
            settings[f.name] = Setting(DEFAULTS[f.name], "default")
    for name, value in PRESETS[settings["preset"].value].items():
        settings.setdefault(name, Setting(value, "preset"))
    if all(k not in settings or settings[k].value is None for k in ("speedup", "throughput", "memory")):
        settings["speedup"] = Setting(DEFAULT_SPEEDUP, "default")
    settings.setdefault("speedup", Setting(None, "default"))
    v = {k: s.value for k, s in settings.items()}

    target = parse_target(v["budget"], dtype=config.dtype)  # a misspelled target fails before the model is read
    cluster = parse_cluster(v.get("cluster") or default_cluster(), max_memory=v.get("max_memory_per_rank"))
    parent, directory = parent_of(v["model"])
    shape = ModelShape.from_config(parent)
    phase = v["scenario"]
    other = "prefill" if phase == "decode" else "decode"
    budget_sc = Scenario(name=phase, phase=phase, batch=v["batch"], length=v["context"])
    memory_bytes = None if v["memory"] is None else v["memory"] * 2**30
    target = choose_tensor_parallel(target, shape, parent.blocks, batch=budget_sc.batch,
                                    kv_tokens=budget_sc.kv_tokens, memory_bytes=memory_bytes, tp=config.tp)
    whole = _whole_bytes(parent, 4)  # timed in fp32, as loaded
    derived = {"dtype": target.dtype, "tp": target.tp, "calibrate": target.is_cpu,
               "fuse_threshold": 0.0 if target.is_cpu else 0.2, "cluster": cluster.name,
               "max_memory_per_rank": f"{cluster.memory_per_rank / 2**30:.1f}GiB",
               # timing needs the parent and the child whole on one rank, one after the other
               "measure_speed": 2 * whole <= cluster.memory_per_rank}
    for name, value in derived.items():
        settings.setdefault(name, Setting(value, "derived"))
    for name, off in (("child_bld_tokens", 0), ("finalists", 1), ("refine_rounds", 0), ("gkd_top_k", 0)):  # one process only
        if cluster.count > 1 and settings[name].value != off:
            if settings[name].source not in ("preset", "default"):
                raise ConfigError(f"{name} {settings[name].value}: it runs in one process and --cluster {cluster.name} "
                                  f"has {cluster.count} ranks; set it to {off}")
            settings[name] = Setting(off, "derived")
    if settings["gkd_batch"].source in ("preset", "default") and settings["gkd_batch"].value % cluster.count:
        n = cluster.count  # FSDP2 splits every GKD batch over the ranks
        settings["gkd_batch"] = Setting(-(-settings["gkd_batch"].value // n) * n, "derived")
    settings = {f.name: settings[f.name] for f in settings_fields()}  # field order

    scenarios = (dataclasses.replace(budget_sc, replicas=target.replicas),
                 Scenario(name=other, phase=other, batch=OTHER_PHASE_BATCH[other], length=v["context"],
                          replicas=target.replicas))
    limits = Budget(speedup=settings["speedup"].value, throughput=v["throughput"], memory_bytes=memory_bytes)
    feasibility = _feasibility(parent, shape, target, scenarios[0], limits, approximate=bool(settings["calibrate"].value),
                               space=search_space(v.get("space"), settings["engine"].value))
    summary = {"model": v["model"], "directory": None if directory is None else str(directory),
               "weights": directory is not None and _has_weights(directory), "layers": parent.num_hidden_layers,
               "hidden_size": parent.hidden_size, "num_attention_heads": parent.num_attention_heads,
               "num_key_value_heads": sorted({b.attention.num_key_value_heads for b in parent.blocks
                                              if b.attention.kind == "gqa"})}
    plan = Plan(config=config, settings=settings, target=target, scenarios=scenarios, limits=limits,
                feasibility=feasibility, parent=summary, parent_config=parent, cluster=cluster)
    resources = plan_resources(parent, Work.from_plan(plan), cluster, space=plan_space(plan))
    return dataclasses.replace(plan, resources=resources)


def search_space(space: Mapping[str, Any] | None, engine: str | None) -> Any:
    """The :class:`block_library.space.SearchSpace` of a ``space`` setting, kept to what ``engine`` loads."""
    from block_library.space import SearchSpace

    return dataclasses.replace(SearchSpace.from_dict(space), engine=engine)


def plan_space(plan: Plan) -> Any:
    """The plan's search space: its ``space`` setting, kept to what its ``engine`` loads."""
    return search_space(plan.space, plan.engine)


def parent_of(model: str) -> tuple[Any, Any]:
    """The parent's runtime config and its directory; a shape name (``llama-3.1-70b``) has no directory."""
    from pathlib import Path

    from puzzle.loading import load_config, resolve_source
    from puzzle.parents.embedded import canonical_name
    from puzzle.parents.hf import puzzle_config_from_hf
    from puzzle.parents.shapes import canonical_shape, shape_config_json

    if not Path(model).expanduser().exists() and canonical_name(model) is None and canonical_shape(model):
        return puzzle_config_from_hf(shape_config_json(model), where=model), None
    source = resolve_source(model)
    return load_config(source), source.directory


def _has_weights(directory: Any) -> bool:
    from pathlib import Path

    return any(Path(directory).glob("*.safetensors"))


def _whole_bytes(config: Any, dtype_bytes: int) -> float:
    from puzzle.summary import totals

    return float(totals(config).params * dtype_bytes)


def _feasibility(config: Any, shape: Any, target: Any, scenario: Any, limits: Any, *, approximate: bool,
                 space: Any = None) -> Feasibility:
    """The cheapest child of the default search space against the parent, on ``target`` in ``scenario``."""
    from puzzle.profiler.table import cost_table, space_candidates

    candidates = space_candidates(config, space=space)
    table = cost_table(shape, candidates, config.blocks, target=target, scenarios=[scenario])
    col = scenario.column
    fixed = table[table["layer"] == -1].iloc[0]
    layers = table[table["layer"] >= 0]
    parent_rows = layers[layers["is_parent"].astype(bool)]
    kv = scenario.cache_tokens  # KV tokens per device: batch x tokens cached per sequence

    def memory(rows: Any) -> float:
        return float(rows["weight_bytes"].sum() + fixed["weight_bytes"] + kv * rows["kv_bytes_per_token"].sum())

    parent_ms = float(parent_rows[col].sum() + fixed[col])
    best_ms = float(layers.groupby("layer")[col].min().sum() + fixed[col])
    mem = layers.assign(m=layers["weight_bytes"] + kv * layers["kv_bytes_per_token"])
    min_memory = float(mem.groupby("layer")["m"].min().sum() + fixed["weight_bytes"])
    max_speedup = parent_ms / best_ms
    max_throughput = scenario.throughput(best_ms)
    slack = CALIBRATED_SLACK if approximate else 1.0
    problems = []
    where = f"on {target.name} ({scenario.phase}, batch {scenario.batch}, length {scenario.length})"
    if limits.speedup is not None and (math.isinf(limits.speedup) or limits.speedup > max_speedup * slack * (1 + 1e-9)):
        problems.append(f"speedup >= {limits.speedup:g}x is infeasible: at most {max_speedup:.1f}x {where}, "
                        f"with every layer at its cheapest variant")
    if limits.throughput is not None and (math.isinf(limits.throughput)
                                          or limits.throughput > max_throughput * slack * (1 + 1e-9)):
        problems.append(f"throughput >= {limits.throughput:g} tokens/s is infeasible: at most {max_throughput:.4g} "
                        f"tokens/s {where}")
    if limits.memory_bytes is not None and limits.memory_bytes * (1 + 1e-9) < min_memory:  # bytes need no calibration
        problems.append(f"memory <= {limits.memory_bytes / 2**30:g} GiB/device is infeasible: the smallest child "
                        f"needs {min_memory / 2**30:.3g} GiB/device {where}")
    return Feasibility(parent_ms=parent_ms, best_ms=best_ms, max_speedup=max_speedup, max_throughput=max_throughput,
                       min_memory_gib=min_memory / 2**30, parent_memory_gib=memory(parent_rows) / 2**30,
                       problems=tuple(problems), approximate=approximate)


def check_feasible(plan: Plan) -> None:
    """:class:`InfeasibleBudgetError` naming the first unreachable budget and the best reachable value."""
    if plan.feasibility.problems:
        raise InfeasibleBudgetError(plan.feasibility.problems[0])
