"""How well the MIP's additive score predicts a child's measured KL, over MIP optima of different costs.

    python benchmarks/score_fidelity.py [--quick] [--run runs/quality-quick-s0] [--budgets 20] [--score kl]

Reads a finished ``puzzle search --budget cpu`` (``benchmarks/quality.py`` makes one: its library, replace-1
scores and costs). For ``--budgets`` decoder-parameter budgets evenly spaced from 40% to 95% of the parent's
decoder, the MIP's optimum under the score column ``--score`` is assembled and its KL to the parent measured
on 4 x 256 held-out validation tokens that neither the search nor ``benchmarks/quality.py``'s evaluation read
(the finalists' tokens). Reports Spearman's and Pearson's correlation between the predicted loss (the summed
scores, the MIP's objective) and the measured KL, over all budgets and within the upper and lower halves.

Writes ``benchmarks/results/score_fidelity.csv``: one row per budget (flops_pct, score, predicted, measured kl,
top1, blocks) and a summary printed. ``--quick``: a random 3-layer parent searched with tiny sizes (under a
minute; its numbers mean nothing), written to ``results/score_fidelity_quick.csv``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's root: benchmarks.*

RESULTS = Path(__file__).parent / "results"


def sweep(run_dir: Path, *, quick: bool, budgets: int, score: str, progress: bool) -> pd.DataFrame:
    """One row per budget: the MIP optimum's predicted and measured KL."""
    import numpy as np

    from benchmarks.quality import RESERVED, search_config
    from block_library import open_library
    from puzzle.loading import load_model, load_tokenizer
    from puzzle.search import resolve
    from puzzle.search.finalists import finalist_ids, measure_finalists
    from solvers import Budget, solve
    from solvers.io import problem_from_tables

    plan = resolve(search_config(quick, "quick", 0, str(run_dir.parent / "parent") if quick else None))
    lib = open_library(run_dir / "library" / "lib")
    parent, tok = load_model(plan.model), load_tokenizer(plan.model)
    ids = finalist_ids(plan.data, tok, skip=RESERVED, sequences=2 if quick else 4)
    scores = pd.read_csv(run_dir / "score" / "scores" / "scores.csv")
    costs = pd.read_csv(run_dir / "profile" / "costs.csv")
    fixed = float(costs[costs.variant == "fixed"].params.sum())
    decoder = float(costs[costs.is_parent.astype(bool)].params.sum())
    fractions = np.linspace(0.40, 0.95, budgets)
    sols = []
    for f in fractions:
        problem = problem_from_tables(scores, costs, score_column=score, budget=Budget(max_params=fixed + f * decoder))
        sols.append(solve(problem, backend=plan.value("solver")))
    measured = sorted(measure_finalists(lib, parent, sols, ids, progress=progress), key=lambda m: m.mip_rank)
    rows = []
    for f, m in zip(fractions, measured, strict=True):
        r = m.row()
        rows.append({"flops_budget_pct": round(100 * f, 1), "flops_pct": round(100 * (r["params"] - fixed) / decoder, 1),
                     "score": score, "predicted": r["predicted_kl"], "kl": r["kl"], "top1": r["top1_agreement"],
                     "blocks": r["blocks"]})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Spearman and Pearson correlations of predicted and measured KL, over all budgets and each half."""
    half = len(df) // 2
    parts = {"all budgets": df, "upper half (most FLOPs)": df.iloc[half:], "lower half": df.iloc[:half]}
    return pd.DataFrame([{"budgets": name, "children": len(d), "spearman": d.predicted.rank().corr(d.kl.rank()),
                          "pearson": d.predicted.corr(d.kl)} for name, d in parts.items()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random parent, tiny sizes (under a minute)")
    ap.add_argument("--run", default=None, help="a finished search of benchmarks/quality.py (default "
                    "runs/quality-quick-s0; --quick: searched in a temp dir)")
    ap.add_argument("--budgets", type=int, default=None, help="MIP optima measured (default 20; --quick: 6)")
    ap.add_argument("--score", default="kl", help="the scores table's column the MIP sums (default kl)")
    args = ap.parse_args()
    budgets = args.budgets if args.budgets is not None else (6 if args.quick else 20)
    if budgets < 3:
        ap.error("--budgets must be at least 3 (a rank correlation)")
    t0 = time.perf_counter()
    if args.quick:
        from benchmarks.quality import search_config
        from benchmarks.tiny_parent import write_tiny_parent
        from puzzle.search import search

        run_dir = Path(tempfile.mkdtemp(prefix="puzzle-fidelity-")) / "run"
        write_tiny_parent(run_dir.parent / "parent")
        search(search_config(True, "quick", 0, str(run_dir.parent / "parent")), run_dir, progress=False)
    else:
        run_dir = Path(args.run or "runs/quality-quick-s0")
        if not (run_dir / "score" / "scores" / "scores.csv").is_file():
            ap.error(f"--run {run_dir} holds no finished search: run benchmarks/quality.py first")
    df = sweep(run_dir, quick=args.quick, budgets=budgets, score=args.score, progress=not args.quick)
    from puzzle.io import atomic_write_text

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("score_fidelity_quick.csv" if args.quick else "score_fidelity.csv")
    atomic_write_text(out, df.to_csv(index=False))
    print(df.drop(columns=["blocks"]).round(4).to_string(index=False))
    print(summary(df).round(3).to_string(index=False))
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
