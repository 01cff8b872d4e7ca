"""``puzzle plan``: what ``puzzle search`` would do with the same flags, without doing any of it.

    puzzle plan --budget 8xH100 --speedup 2.0            # settings and their sources, target, stages, feasibility
    puzzle plan --config runs/search.yaml --json         # the same as JSON (what search writes to OUT/plan.json)

Exit status 2 when the plan cannot run (an unreachable budget, a bad --out): the reason is printed
as one line, after the plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from puzzle.engines import engine_rules
from puzzle.errors import PuzzleError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from puzzle.cli.search_flags import add_search_flags

    p = sub.add_parser("plan", help="print the resolved plan of a search (settings, target, stages, feasibility) "
                       "without running it", description="Resolve the settings of `puzzle search` (same flags) "
                       "once, as the search would: every setting with where it came from (default, preset, derived, "
                       "file, flag), the deployment target (accelerator, count, tensor parallelism, replicas, dtype), "
                       "the scenarios, the stages that would run or be skipped in --out, and whether the budget is "
                       "reachable at all. Reads the parent's config.json only; writes nothing.")
    add_search_flags(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def stage_rows(plan: Any, stages: list[dict[str, str]] | None) -> list[dict[str, Any]]:
    """One item per stage: what a search in --out would do (run / skip) and its planned resources
    (``peak_device_gib`` and ``peak_host_gib`` of the largest rank, ``disk_gib``, ``predicted_s``, ``rounds``)."""
    actions = {r["stage"]: r for r in stages or []}
    rows = []
    names = [s.stage for s in plan.resources.stages] + [k for k in actions if k not in plan.resources.stage_names]
    for name in names:
        row: dict[str, Any] = {"stage": name}
        row.update(actions.get(name, {"action": "run", "reason": "planned"}))
        if name in plan.resources.stage_names:
            use = plan.resources.stage(name).to_dict()
            row.update({k: v for k, v in use.items() if k != "stage"})
        rows.append(row)
    return rows


def plan_document(plan: Any, stages: list[dict[str, str]] | None, problem: str | None = None) -> dict[str, Any]:
    """The plan as ``puzzle plan --json`` prints it: ``plan.json`` plus the stages and any refusal."""
    doc = plan.to_dict()
    doc["stages"] = stage_rows(plan, stages)
    doc["problem"] = problem
    return doc


def print_resources(plan: Any) -> None:
    """The resource plan: one line per stage, the largest rank's figures (predictions, not measurements)."""
    r, c = plan.resources, plan.cluster
    print(f"  cluster: {c.name}, {c.count} rank{'s' if c.count != 1 else ''}, {c.memory_per_rank / 2**30:.1f} GiB "
          f"per rank{' (--max-memory-per-rank)' if c.given_memory else ''}; predicted, per stage, largest rank:")
    print(f"    {'stage':<9} {'device GiB':>10} {'host GiB':>9} {'disk GiB':>9} {'rounds':>6} {'predicted':>10}  how")
    for s in r.stages:
        flag = "" if s.fits else "  DOES NOT FIT"
        print(f"    {s.stage:<9} {s.peak_device_bytes / 2**30:>10.2f} {s.peak_host_bytes / 2**30:>9.2f} "
              f"{s.disk_bytes / 2**30:>9.2f} {s.rounds:>6} {_duration(s.seconds):>10}  {s.how}{flag}")
    print(f"    {'total':<9} {'':>10} {'':>9} {'':>9} {'':>6} {_duration(r.seconds):>10}")
    if r.problem:
        print(f"  DOES NOT FIT: {r.problem}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def print_plan(plan: Any, stages: list[dict[str, str]] | None, *, brief: bool = False) -> None:
    """The plan as a terminal table; ``brief``: the summary ``puzzle search`` prints first."""
    t = plan.target
    print(f"plan: {plan.model} ({plan.parent['layers']} layers, hidden {plan.parent['hidden_size']}, "
          f"{plan.parent['num_attention_heads']} heads, KV heads {plan.parent['num_key_value_heads']})")
    print(f"  target: {t.count}x {t.accelerator.name}, tensor parallel {t.tp}, {t.replicas} "
          f"replica{'s' if t.replicas != 1 else ''}, {t.dtype}")
    print(f"  budget: {plan.budget_text()}")
    rules = engine_rules(plan.engine)
    removed = rules.removes()
    print(f"  engine: {rules.title} ({plan.engine}){': the search space leaves out ' + ', '.join(removed) if removed else ''}")
    f = plan.feasibility
    approx = " (uncalibrated estimate)" if f.approximate else ""
    print(f"  reachable{approx}: speedup up to {f.max_speedup:.3g}x, throughput up to {f.max_throughput:.4g} tokens/s, "
          f"memory down to {f.min_memory_gib:.3g} GiB/device (parent {f.parent_memory_gib:.3g})")
    for problem in f.problems:
        print(f"  INFEASIBLE: {problem}")
    if not plan.parent.get("weights", True):
        print("  weights: none yet (a plan from the config alone; `puzzle search` needs the model's safetensors)")
    if not brief or not plan.resources.fits:
        print_resources(plan)
    if not brief:
        print("  settings:")
        width = max(len(k) for k in plan.settings)
        for name, s in plan.settings.items():
            value = ", ".join(map(str, s.value)) if isinstance(s.value, tuple) else s.value
            print(f"    {name:<{width}}  {value!s:<24} ({s.source})")
    for note in plan.notes:  # a value the plan changed from its preset or default, and why
        print(f"  note: {note}")
    if stages:
        runs = [r["stage"] for r in stages if r["action"] == "run"]
        if brief:
            print(f"  stages: {len(stages) - len(runs)} up to date, to run: {', '.join(runs) or 'none'}")
        else:
            print("  stages:")
            for r in stages:
                print(f"    {r['stage']:<10} {r['action']:<5} {r['reason']}")


def run(args: argparse.Namespace) -> int:
    from puzzle.cli.search_flags import config_from_args
    from puzzle.search import planned_stages, resolve
    from puzzle.search.preflight import check_plan, preflight

    plan = resolve(config_from_args(args))
    stages, problem = None, None
    try:
        if plan.parent.get("weights"):  # without weights (a shape, a config.json alone) there is only the plan
            preflight(plan, args.out, force=args.force, searching=False)  # it sizes any cluster
            stages = planned_stages(plan, args.out, verify=args.verify)
        else:
            check_plan(plan)
    except PuzzleError as e:
        problem = str(e)
    if args.json:
        print(json.dumps(plan_document(plan, stages, problem), indent=2, default=str))
    else:
        print_plan(plan, stages)
    if problem is not None:
        print(f"puzzle plan: error: {problem}", file=sys.stderr)
        return 2
    return 0
