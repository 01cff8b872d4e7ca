"""Predicted speedup against speed inside vLLM: SmolLM2 children searched for this CPU, timed in the engine.

    python benchmarks/engine_speed.py            # children at 1.25x, 1.5x, 2x predicted decode speedup (~25 min)
    python benchmarks/engine_speed.py --quick    # the 1.5x child only, small stage sizes (~6 min: vLLM starts twice)

Runs ``puzzle search --budget cpu --engine vllm --speedup S`` for each S in one run directory (the library,
BLD, scoring and profile run once; a new speedup reruns the MIP onward), GKD off (it changes quality, not
speed). The evaluate stage times parent and child in this project's runtime and inside vLLM
(:func:`puzzle.evaluation.engine_speed.engine_speed`: both models loaded, interleaved rounds, fastest kept).
Prints the table and writes ``benchmarks/results/engine_speed.csv`` (``engine_speed_quick.csv``): per child
and scenario, the predicted speedup (this CPU's calibrated roofline), the speedup measured in vLLM and in
this project's runtime, and ``ratio`` = engine / predicted. Needs vLLM (``puzzle.engines.vllm.INSTALL``).
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


def run_child(speedup: float, run_dir: Path, *, quick: bool) -> dict:
    import puzzle
    from puzzle.search import SearchConfig

    cfg = SearchConfig(model="smollm2-135m", budget="cpu", engine="vllm", speedup=speedup, gkd_steps=0,
                       **(QUICK if quick else {}))
    start = time.perf_counter()
    run = puzzle.search(cfg, run_dir=run_dir, progress=False)
    seconds = time.perf_counter() - start
    evaluation = json.loads(Path(run.stages["evaluate"].outputs["evaluation"]).read_text())
    report = run.report.set_index("model")
    blocks = json.loads((run_dir / "solve" / "solution.json").read_text())["chosen"]
    return {"speedup": speedup, "engine_speed": evaluation.get("engine_speed") or [], "report": report,
            "seconds": seconds, "chosen": blocks}


def rows_of(result: dict) -> list[dict]:
    report = result["report"]
    out = []
    for e in result["engine_speed"]:
        sc = e["scenario"]
        runtime = report.loc["child", f"meas_{sc}_speedup"] if f"meas_{sc}_speedup" in report else float("nan")
        out.append({"solution": f"speedup={result['speedup']:g}", "scenario": sc, "batch": e["batch"],
                    "length": e["length"], "predicted_speedup": report.loc["child", f"pred_{sc}_speedup"],
                    "engine_speedup": e["engine_speedup"], "runtime_speedup": runtime,
                    "ratio": e["engine_speedup"] / report.loc["child", f"pred_{sc}_speedup"],
                    "parent_ms": e["parent_ms"], "child_ms": e["child_ms"], "layers": int(report.loc["child", "layers"]),
                    "no_op_attention": sum(v.startswith("no_op|") for v in result["chosen"].values()),
                    "kl": report.loc["child", "kl_to_parent"], "search_s": round(result["seconds"], 1)})
    return out


def main() -> int:
    from puzzle.engines import vllm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the 1.5x child only, small stage sizes")
    ap.add_argument("--run", type=Path, help="run directory to keep (default: a temporary one)")
    ap.add_argument("--out", type=Path, help="CSV path (default: benchmarks/results/engine_speed[_quick].csv)")
    args = ap.parse_args()
    vllm.require()
    speedups = [1.5] if args.quick else [1.25, 1.5, 2.0]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or Path(tmp) / "run"
        rows = [r for s in speedups for r in rows_of(run_child(s, run_dir, quick=args.quick))]
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
