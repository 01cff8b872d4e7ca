"""Predicted speedup against speed inside vLLM: SmolLM2 children searched for this CPU, timed in the engine.

    python benchmarks/engine_speed.py                  # children at 1.25x, 1.5x, 2x predicted decode speedup
    python benchmarks/engine_speed.py --speedups 1.5   # one child
    python benchmarks/engine_speed.py --quick          # the 1.5x child, small stage sizes

Runs ``puzzle search --budget cpu --engine vllm --speedup S --gkd-steps 0 --no-speed`` for each S in one run
directory (the library, BLD, scoring and the calibrated profile run once; a new speedup reruns the MIP onward;
GKD changes quality, not speed), then times parent and child in the budget's decode scenario (batch 8,
context 1024): inside vLLM (:func:`puzzle.evaluation.engine_speed.engine_speed`: both models loaded,
interleaved rounds, fastest kept; about 70 s a round on 2 cores, as every call prefills 8 x 1024 tokens)
and in this project's runtime. Prints each row as it lands and writes ``benchmarks/results/engine_speed.csv``
(``engine_speed_quick.csv``): predicted speedup (this CPU's calibrated roofline), the speedup measured in
vLLM and in the runtime, and ``ratio`` = engine / predicted. Needs vLLM (``puzzle.engines.vllm.INSTALL``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
QUICK = dict(bld_tokens=2048, bld_eval_sequences=4, score_sequences=1, score_seq_len=64, eval_sequences=1)


def run_child(speedup: float, run_dir: Path, *, quick: bool, rounds: int) -> dict:
    """Search the child (no timing inside the search), then time it against the parent in the budget's decode
    scenario: inside vLLM and in this project's runtime."""
    import puzzle
    from puzzle.evaluation import measure_speed
    from puzzle.evaluation.engine_speed import engine_speed
    from puzzle.loading import load_model, resolve_source
    from puzzle.search import SearchConfig
    from puzzle.search.stages.profile import costing_target

    cfg = SearchConfig(model="smollm2-135m", budget="cpu", engine="vllm", speedup=speedup, gkd_steps=0,
                       measure_speed=False, **(QUICK if quick else {}))
    start = time.perf_counter()
    run = puzzle.search(cfg, run_dir=run_dir, progress=False)
    seconds = time.perf_counter() - start
    report = run.report.set_index("model")
    parent_dir = resolve_source("smollm2-135m").directory
    decode = run.plan.budget_scenario  # decode, batch 8, context 1024
    target = costing_target(run.plan, run.stages["profile"].directory)
    engine = engine_speed(run.export_dir, parent_dir, [decode], target=target, rounds=rounds, progress=True).iloc[0]
    runtime = measure_speed({"parent": load_model(parent_dir), "child": load_model(run.export_dir)}, [decode],
                            rounds=rounds).set_index("model")
    blocks = json.loads((run_dir / "solve" / "solution.json").read_text())["chosen"]
    return {"solution": f"speedup={speedup:g}", "scenario": decode.name, "batch": decode.batch, "length": decode.length,
            "predicted_speedup": report.loc["child", f"pred_{decode.name}_speedup"],
            "engine_speedup": engine.engine_speedup, "runtime_speedup": runtime.loc["parent", "ms"] / runtime.loc["child", "ms"],
            "ratio": engine.engine_speedup / report.loc["child", f"pred_{decode.name}_speedup"],
            "engine_parent_ms": engine.parent_ms, "engine_child_ms": engine.child_ms,
            "runtime_parent_ms": runtime.loc["parent", "ms"], "runtime_child_ms": runtime.loc["child", "ms"],
            "layers": int(report.loc["child", "layers"]),
            "no_op_attention": sum(v.startswith("no_op|") for v in blocks.values()),
            "kl": report.loc["child", "kl_to_parent"], "search_s": round(seconds, 1), "rounds": rounds}


def main() -> int:
    from puzzle.engines import vllm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the 1.5x child only, small stage sizes")
    ap.add_argument("--run", type=Path, help="run directory to keep (default: a temporary one)")
    ap.add_argument("--out", type=Path, help="CSV path (default: benchmarks/results/engine_speed[_quick].csv)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds, fastest kept (default: 3)")
    ap.add_argument("--speedups", type=float, nargs="+", help="predicted decode speedups to search (default: 1.25 1.5 2; "
                    "--quick: 1.5)")
    args = ap.parse_args()
    vllm.require()
    speedups = args.speedups or ([1.5] if args.quick else [1.25, 1.5, 2.0])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or Path(tmp) / "run"
        rows = []
        for s in speedups:  # one row at a time, so a long run shows its progress
            rows.append(run_child(s, run_dir, quick=args.quick, rounds=args.rounds))
            print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format="{:.3f}".format), flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False, float_format="{:.3f}".format))
    path = args.out or RESULTS / ("engine_speed_quick.csv" if args.quick else "engine_speed.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # vLLM starts its workers with spawn
    raise SystemExit(main())
