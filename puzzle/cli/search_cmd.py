"""``puzzle search``: the whole pipeline into one run directory, resumable stage by stage.

    puzzle search --budget 8xH100                                   # SmolLM2-135M, stdlib, quick preset
    puzzle search --budget 8xH100 --speedup 2.0 --out runs/search   # a new budget: only MIP onward reruns
    puzzle search --config runs/search.yaml                         # YAML keys are the settings' names
    puzzle search --constraint "layer[0] == parent" --constraint "count(attention != no_op) >= 20"
"""

from __future__ import annotations

import argparse

from puzzle.cli.search_flags import add_search_flags, config_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="run the whole search: library, BLD, scoring, profile, MIP, fusion, GKD, "
                       "export, evaluation", description="Turn a parent into a faster child under a hardware "
                       "budget. The settings are resolved once into a plan (printed first, written to OUT/plan.json; "
                       "`puzzle plan` shows it without running) and checked before anything is written. Every stage "
                       "writes OUT/<stage>/ with a manifest; rerunning skips stages whose inputs and files did not "
                       "change and resumes an interrupted one; a new budget re-solves without retraining. "
                       "Ends with OUT/export/model (DeciLM checkpoint) and OUT/report.csv / report.png.")
    add_search_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from puzzle.search.lock import claim

    with claim(args.out):  # another search on --out: refused at once, before the seconds of imports and checks
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import pandas as pd

    from puzzle.cli.plan_cmd import print_plan
    from puzzle.search import planned_stages, resolve, search
    from puzzle.search.preflight import preflight

    import logging
    import os

    first = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the run
    if not first:
        logging.getLogger().setLevel(logging.WARNING)
    plan = resolve(config_from_args(args))
    preflight(plan, args.out, force=args.force)  # nothing is printed as a plan that cannot run
    if first:
        print_plan(plan, planned_stages(plan, args.out, verify=args.verify), brief=True)
    run = search(plan, args.out, progress=not args.no_progress, echo=print, verify=args.verify, force=args.force)
    if not first:
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(run.report.set_index("model").T.to_string())
        if "baselines" in run.stages:
            cols = ["model", "feasible", "pred_decode_speedup", "meas_decode_speedup", "pred_prefill_speedup",
                    "meas_prefill_speedup", "kl_to_parent", "top1_agreement", "ppl"]
            table = pd.read_csv(run.stages["baselines"].outputs["table"])
            print(f"\nbaselines at the same budget, same GKD ({run.stages['baselines'].outputs['plot']}):")
            print(table[[c for c in cols if c in table]].to_string(index=False))
    print(f"child: {run.export_dir} (DeciLM; load with AutoModelForCausalLM.from_pretrained(dir, "
          f"trust_remote_code=True) or puzzle.loading.load_model)\nreport: {run.directory / 'report.png'}")
    return 0
