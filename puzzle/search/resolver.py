"""``resolve(config) -> Plan``: the one place where a search's settings get their defaults.

    from puzzle.search import SearchConfig, resolve
    plan = resolve(SearchConfig(budget="8xH100", speedup=1.5))

Defaults, preset values and the readers of every setting come from the settings table
(:data:`puzzle.search.settings.SETTINGS`); here they are filled in by one rule (what the user said,
else the preset's value, else the default, else derived from the target and the cluster), the
target and the cluster are parsed once, the budget's reachability is measured and every stage's
resources are planned (:mod:`puzzle.search.resource_plan`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from puzzle.errors import ConfigError
from puzzle.search.config import SearchConfig
from puzzle.search.plan import Feasibility, Plan, Setting
from puzzle.search.setting import DERIVED, PerParameter
from puzzle.search.settings import DEFAULT_SPEEDUP, SETTINGS

OTHER_PHASE_BATCH = {"prefill": 1, "decode": 8}
"""Batch of the phase the budget is not about (reported, not constrained): one prompt, or 8 sequences decoding."""
CALIBRATED_SLACK = 2.0
"""A calibrated CPU target is costed only after the profile stage fits it, so the preflight refuses a
speedup only when it is this many times beyond the uncalibrated analytic best."""
ONE_PROCESS = {"refine_rounds": (0, "refinement re-scores swaps of the finalists' blocks around the best child with "
                                    "the parent and the child whole in one process; it is not sharded")}
"""Settings whose work runs in one process only: their value on a cluster of several ranks, and why. Every other
quality stage (child-aware BLD and its refit, the finalists, the teacher cache) is layer-sharded or FSDP2-sharded."""


def resolve(config: SearchConfig | None = None) -> Plan:
    """Fill in every default of ``config``, parse the target once and check the budget is reachable.

    Reads the parent's ``config.json`` (no weights), or takes a shape name (``llama-3.1-70b``), and
    plans every stage's memory and time on the cluster (:attr:`Plan.resources`). Raises a typed error for an
    unknown model, target or dtype and for an invalid ``tp``; an unreachable budget is *reported* in
    :attr:`Plan.feasibility` (:func:`puzzle.search.plan.check_feasible` raises it).
    """
    from puzzle.profiler.counts import ModelShape
    from puzzle.profiler.deployment import choose_tensor_parallel
    from puzzle.profiler.hardware import parse_target
    from puzzle.search.cluster import default_cluster, parse_cluster
    from puzzle.search.plan import search_space
    from puzzle.search.resource_plan import plan_resources
    from solvers import Budget, Scenario

    config = config or SearchConfig()
    settings = _said_or_default(config)
    v = {k: s.value for k, s in settings.items()}
    target = parse_target(v["budget"], dtype=config.dtype)  # a misspelled target fails before the model is read
    cluster = parse_cluster(v.get("cluster") or default_cluster(), max_memory=v.get("max_memory_per_rank"))
    parent, directory = parent_of(v["model"])
    shape = ModelShape.from_config(parent)
    params = _whole_bytes(parent, 1)
    for name, s in list(settings.items()):  # a preset's count that grows with the parent (the production preset)
        if isinstance(s.value, PerParameter):
            settings[name] = Setting(s.value.of(params), s.source)
            v[name] = settings[name].value
    phase = v["scenario"]
    other = "prefill" if phase == "decode" else "decode"
    budget_sc = Scenario(name=phase, phase=phase, batch=v["batch"], length=v["context"])
    memory_bytes = None if v["memory"] is None else v["memory"] * 2**30
    target = choose_tensor_parallel(target, shape, parent.blocks, batch=budget_sc.batch,
                                    kv_tokens=budget_sc.kv_tokens, memory_bytes=memory_bytes, tp=config.tp)
    whole = _whole_bytes(parent, 4)  # timed in fp32, as loaded
    quality_context = _quality_context(settings, parent, budget_sc.length)
    derived = {"quality_context": quality_context, "score_seq_len": quality_context,
               "dtype": target.dtype, "tp": target.tp, "calibrate": target.is_cpu,
               "fuse_threshold": 0.0 if target.is_cpu else 0.2, "cluster": cluster.name,
               "max_memory_per_rank": f"{cluster.memory_per_rank / 2**30:.1f}GiB",
               # timing needs the parent and the child whole on one rank, one after the other
               "measure_speed": 2 * whole <= cluster.memory_per_rank}
    for name, value in derived.items():
        settings.setdefault(name, Setting(value, "derived"))
    notes = _one_process(settings, cluster)
    missing = [s.name for s in SETTINGS if s.name not in settings]
    if missing:  # a table row whose default says "derived" must be derived above
        raise ValueError(f"settings {missing} have no value: derive them in resolve()")
    settings = {s.name: settings[s.name] for s in SETTINGS}  # the table's order

    scenarios = (dataclasses.replace(budget_sc, replicas=target.replicas),
                 Scenario(name=other, phase=other, batch=OTHER_PHASE_BATCH[other], length=v["context"],
                          replicas=target.replicas))
    limits = Budget(speedup=settings["speedup"].value, throughput=v["throughput"], memory_bytes=memory_bytes)
    feasibility = _feasibility(parent, shape, target, scenarios[0], limits, approximate=bool(settings["calibrate"].value),
                               space=search_space(v.get("space"), settings["engine"].value))
    from puzzle.parents.hub import snapshot_of

    summary = {"model": v["model"], "directory": None if directory is None else str(directory),
               **({"commit": snap[1]} if directory is not None and (snap := snapshot_of(directory)) else {}),
               "weights": directory is not None and _has_weights(directory), "layers": parent.num_hidden_layers,
               "hidden_size": parent.hidden_size, "num_attention_heads": parent.num_attention_heads,
               "num_key_value_heads": sorted({b.attention.num_key_value_heads for b in parent.blocks
                                              if b.attention.kind == "gqa"})}
    plan = Plan(config=config, settings=settings, target=target, scenarios=scenarios, limits=limits,
                feasibility=feasibility, parent=summary, parent_config=parent, cluster=cluster, notes=tuple(notes))
    return dataclasses.replace(plan, resources=plan_resources(plan))


def _quality_context(settings: dict[str, Setting], parent: Any, length: int) -> int:
    """The quality context: what the user said, else the budget scenario's length; at most the parent's positions
    (``max_position_embeddings``), which a said value may not pass either (one line naming it)."""
    limit = getattr(parent, "max_position_embeddings", None) or length
    for name in ("quality_context", "score_seq_len"):
        said = settings.get(name)
        if said is not None and said.value is not None and said.value > limit:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {said.value} is longer than the parent's max_position_embeddings ({limit}): "
                              f"use at most {limit}")
    said = settings.get("quality_context")
    return int(said.value) if said is not None and said.value is not None else min(length, limit)


def _said_or_default(config: SearchConfig) -> dict[str, Setting]:
    """What the user said, else the preset's value, else the table's plain default (derived ones come later)."""
    settings: dict[str, Setting] = {}
    for spec in SETTINGS:
        if getattr(config, spec.name) is not None:
            settings[spec.name] = Setting(getattr(config, spec.name), config.origin.get(spec.name, "keyword"))
        elif spec.default != DERIVED and not spec.presets and spec.name != "speedup":
            settings[spec.name] = Setting(spec.default, "default")
    for name, value in SETTINGS.presets()[settings["preset"].value].items():
        settings.setdefault(name, Setting(value, "preset"))
    if all(k not in settings or settings[k].value is None for k in ("speedup", "throughput", "memory")):
        settings["speedup"] = Setting(DEFAULT_SPEEDUP, "default")
    settings.setdefault("speedup", Setting(None, "default"))
    return settings


def _one_process(settings: dict[str, Setting], cluster: Any) -> list[str]:
    """On a cluster of several ranks: a one-process setting the user gave is refused (one line, why); one a preset
    gave gets its one-rank value, and a GKD batch is rounded up to split over the ranks. Returns a note for every
    value changed so (printed under the plan: nothing changes silently)."""
    notes = []
    for name, (off, why) in ONE_PROCESS.items():
        if cluster.count > 1 and settings[name].value != off:
            flag = "--" + name.replace("_", "-")
            if settings[name].source not in ("preset", "default"):
                raise ConfigError(f"{flag} {settings[name].value}: {why}, and --cluster {cluster.name} has "
                                  f"{cluster.count} ranks; set {flag} {off} or search on one rank")
            notes.append(f"{name} {off} (the {settings[name].source} said {settings[name].value}): {why}")
            settings[name] = Setting(off, "derived")
    batch = settings["gkd_batch"]
    if batch.value % cluster.count:
        n = cluster.count  # FSDP2 splits every GKD batch over the ranks
        if batch.source not in ("preset", "default"):
            raise ConfigError(f"--gkd-batch {batch.value} does not split over the {n} ranks of --cluster "
                              f"{cluster.name}: use a multiple of {n}")
        settings["gkd_batch"] = Setting(-(-batch.value // n) * n, "derived")
        notes.append(f"gkd_batch {settings['gkd_batch'].value} (the {batch.source} said {batch.value}): FSDP2 splits "
                     f"every GKD batch over the {n} ranks")
    return notes


def parent_of(model: str) -> tuple[Any, Any]:
    """The parent's runtime config and its directory; a shape name (``llama-3.1-70b``) has no directory."""
    from pathlib import Path

    from puzzle.loading import load_config, resolve_source
    from puzzle.parents.embedded import canonical_name
    from puzzle.parents.hf import puzzle_config_from_hf
    from puzzle.parents.shapes import canonical_shape, shape_config_json

    if not Path(model).expanduser().exists() and canonical_name(model) is None and canonical_shape(model):
        return puzzle_config_from_hf(shape_config_json(model), where=model), None
    source = resolve_source(model, config_only=True)  # a hub id: its config.json alone (the search reads the rest)
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
