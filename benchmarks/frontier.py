"""Accuracy-efficiency frontier of puzzle vs baselines on SmolLM2-135M, on this CPU.

    python benchmarks/frontier.py [--quick] [--speedups 1.25,1.5,2.0] [--seed 0] [--no-speed] [--out runs/frontier-cpu]

For each decode-speedup target, ``puzzle search --budget cpu`` (roofline calibrated on this
machine, quick preset) picks the child; the same budget then builds three baselines from the
same BLD-trained library (uniform FFN width, ShortGPT layer removal by block influence,
attention removal by attention influence), each given the same child-aware BLD and the same GKD (16 steps
of 2 x 256 tokens, on the parent's cached top-64 targets), and every child is timed against the parent in one interleaved run (decode batch 8 with 1024
cached tokens, prefill 1 x 1024). Library, BLD, scores and costs are shared across targets.

The run directory is resumable and is the one ``examples/frontier_smollm2.ipynb`` plots. About
30 minutes on 2 cores the first time. ``--quick``: a random 3-layer parent with tiny stage sizes
(under a minute; its numbers mean nothing), written to ``results/frontier_quick.csv``.

Writes ``benchmarks/results/frontier.csv`` (the rows of other seeds are kept): target_speedup, seed, model,
feasible, predicted and measured speedups (and their ratio), measured tokens/s, KL to the parent, top-1
agreement, perplexity; then prints, per seed and target, puzzle's KL against the best baseline's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's root: benchmarks.tiny_parent

from benchmarks.tiny_parent import write_tiny_parent  # noqa: E402
from puzzle.search import SearchConfig  # noqa: E402
from puzzle.search.baselines import BASELINES  # noqa: E402
from puzzle.search.frontier import search_frontier  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["target_speedup", "model", "feasible", "layers", "params_m", "pred_decode_speedup", "meas_decode_speedup",
           "pred_decode_ratio", "meas_decode_tokens_per_s", "pred_prefill_speedup", "meas_prefill_speedup",
           "kl_to_parent", "top1_agreement", "ppl", "detail"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random parent, tiny sizes (under a minute)")
    ap.add_argument("--speedups", default=None, help="comma-separated decode speedup targets (default 1.25,1.5,2.0)")
    ap.add_argument("--seed", type=int, default=0, help="the search's --seed: the training order of BLD, "
                    "child-aware BLD and GKD (default 0)")
    ap.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                    help="time every child against the parent (default: on; quality alone with --no-speed)")
    ap.add_argument("--out", default=None, help="run directory (default runs/frontier-cpu, runs/frontier-cpu-sSEED "
                    "for other seeds; quick: a temp dir)")
    args = ap.parse_args()
    speedups = [float(x) for x in (args.speedups or ("1.3" if args.quick else "1.25,1.5,2.0")).split(",")]
    if args.seed < 0:
        ap.error(f"--seed must be >= 0, got {args.seed}")
    t0 = time.perf_counter()
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="puzzle-frontier-"))
        cfg = SearchConfig(model=str(write_tiny_parent(tmp / "parent")), budget="cpu", calibrate=False, batch=2, context=64,
                           bld_tokens=2 * 8 * 256, score_sequences=1, score_seq_len=32, fuse_sequences=1,
                           gkd_steps=1, gkd_batch=1, eval_sequences=1, baselines=BASELINES, seed=args.seed,
                           measure_speed=args.speed,
                           engine="transformers")  # the tiny parent's FFN 96: only transformers loads it
        out = Path(args.out or tmp / "run")
    else:
        cfg = SearchConfig(budget="cpu", preset="quick", baselines=BASELINES, seed=args.seed, measure_speed=args.speed)
        out = Path(args.out or ("runs/frontier-cpu" + (f"-s{args.seed}" if args.seed else "")))
    df = search_frontier(cfg, out, speedups, progress=not args.quick, echo=print)
    df = df[[c for c in COLUMNS if c in df]]
    df.insert(1, "seed", args.seed)
    with pd.option_context("display.width", 220, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print(df.drop(columns=["detail"]).to_string(index=False))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("frontier_quick.csv" if args.quick else "frontier.csv")
    if path.is_file() and not args.quick:  # other seeds' rows stay
        old = pd.read_csv(path)
        old = old[old.seed != args.seed] if "seed" in old else old.iloc[0:0]
        df = pd.concat([old, df], ignore_index=True).sort_values(["seed", "target_speedup"], kind="stable")
    from puzzle.io import atomic_write_text

    atomic_write_text(path, df.to_csv(index=False))
    print(verdict(df).to_string(index=False))
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")


def verdict(df: pd.DataFrame) -> pd.DataFrame:
    """Per seed and target: puzzle's KL after GKD against the best feasible baseline's."""
    rows = []
    for (seed, x), d in df.groupby(["seed", "target_speedup"]):
        base = d[~d.model.isin(["parent", "puzzle"]) & d.feasible.astype(bool)].dropna(subset=["kl_to_parent"])
        puzzle = d[d.model == "puzzle"].kl_to_parent
        if puzzle.empty or base.empty:
            continue
        best = base.loc[base.kl_to_parent.idxmin()]
        rows.append({"seed": seed, "target_speedup": x, "puzzle_kl": float(puzzle.iloc[0]), "best_baseline": best.model,
                     "baseline_kl": best.kl_to_parent, "puzzle_wins": float(puzzle.iloc[0]) < best.kl_to_parent})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
