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

from puzzle.errors import PuzzleError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from puzzle.cli.search_cmd import add_search_flags

    p = sub.add_parser("plan", help="print the resolved plan of a search (settings, target, stages, feasibility) "
                       "without running it", description="Resolve the settings of `puzzle search` (same flags) "
                       "once, as the search would: every setting with where it came from (default, preset, derived, "
                       "file, flag), the deployment target (accelerator, count, tensor parallelism, replicas, dtype), "
                       "the scenarios, the stages that would run or be skipped in --out, and whether the budget is "
                       "reachable at all. Reads the parent's config.json only; writes nothing.")
    add_search_flags(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def plan_document(plan: Any, stages: list[dict[str, str]] | None, problem: str | None = None) -> dict[str, Any]:
    """The plan as ``puzzle plan --json`` prints it: ``plan.json`` plus the stages and any refusal."""
    doc = plan.to_dict()
    doc["stages"] = stages or []
    doc["problem"] = problem
    return doc


def print_plan(plan: Any, stages: list[dict[str, str]] | None, *, brief: bool = False) -> None:
    """The plan as a terminal table; ``brief``: the summary ``puzzle search`` prints first."""
    t = plan.target
    print(f"plan: {plan.model} ({plan.parent['layers']} layers, hidden {plan.parent['hidden_size']}, "
          f"{plan.parent['num_attention_heads']} heads, KV heads {plan.parent['num_key_value_heads']})")
    print(f"  target: {t.count}x {t.accelerator.name}, tensor parallel {t.tp}, {t.replicas} "
          f"replica{'s' if t.replicas != 1 else ''}, {t.dtype}")
    print(f"  budget: {plan.budget_text()}")
    f = plan.feasibility
    approx = " (uncalibrated estimate)" if f.approximate else ""
    print(f"  reachable{approx}: speedup up to {f.max_speedup:.3g}x, throughput up to {f.max_throughput:.4g} tokens/s, "
          f"memory down to {f.min_memory_gib:.3g} GiB/device (parent {f.parent_memory_gib:.3g})")
    for problem in f.problems:
        print(f"  INFEASIBLE: {problem}")
    if not brief:
        print("  settings:")
        width = max(len(k) for k in plan.settings)
        for name, s in plan.settings.items():
            value = ", ".join(map(str, s.value)) if isinstance(s.value, tuple) else s.value
            print(f"    {name:<{width}}  {value!s:<24} ({s.source})")
    if stages:
        runs = [r["stage"] for r in stages if r["action"] == "run"]
        if brief:
            print(f"  stages: {len(stages) - len(runs)} up to date, to run: {', '.join(runs) or 'none'}")
        else:
            print("  stages:")
            for r in stages:
                print(f"    {r['stage']:<10} {r['action']:<5} {r['reason']}")


def run(args: argparse.Namespace) -> int:
    from puzzle.cli.search_cmd import config_from_args
    from puzzle.search import planned_stages, resolve
    from puzzle.search.preflight import preflight

    plan = resolve(config_from_args(args))
    stages, problem = None, None
    try:
        preflight(plan, args.out, force=args.force)
        stages = planned_stages(plan, args.out, verify=args.verify)
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
