"""Score fidelity within a budget, before and after context-aware scores; and what refinement finds.

    python benchmarks/refine.py [--quick] [--run runs/quality-quick-s0] [--preset quick] [--fractions 0.75,0.5]
                                [--finalists 20] [--rounds 2]

Reads a finished ``puzzle search --budget cpu`` (``benchmarks/quality.py`` makes one). At each decoder budget
(the parent's decoder with every FFN pruned to ``--fractions`` of its width, as ``benchmarks/quality.py``),
the MIP's ``--finalists`` best different solutions are measured on the finalists' 4 x 256 validation tokens
(what the search chooses on) and on 8 x 256 evaluation tokens after them (what this reports on). Then:

* **before**: Spearman's rank correlation between the MIP's prediction (summed replace-1 scores, around the
  parent) and the evaluation KL, over the finalists;
* **after**: the same for the context-aware prediction around the best finalist
  (:mod:`puzzle.scoring.context`: the finalists' block halves swapped into it, on the finalists' tokens);
* **ceiling**: the same for the finalists' own measured KL (another sample of tokens: no score can rank
  the children better than a second measurement does);
* **refinement** (:mod:`puzzle.search.refine`, ``--rounds``) from the first 4 finalists (the quick preset's
  search) and from all of them: each refined child's evaluation KL against its starting point's.

Writes ``benchmarks/results/refine.csv`` (one row per budget, with seconds) and ``refine_children.csv``
(every finalist and refined child: predictions and measured KLs). ``--quick``: a random 3-layer parent
searched with tiny sizes (under a minute; its numbers mean nothing), written to ``results/refine_quick.csv``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's root: benchmarks.*

RESULTS = Path(__file__).parent / "results"


def _rho(df: pd.DataFrame, a: str, b: str) -> float:
    return float(df[a].rank().corr(df[b].rank())) if len(df) >= 3 else float("nan")


def study(run_dir: Path, *, quick: bool, preset: str, fractions: list[float], k: int, rounds: int,
          progress: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per budget, one row per child)."""
    import torch

    from benchmarks.quality import uniform_width, held_out, search_config, uniform_library
    from block_library import open_library
    from puzzle.loading import load_model, load_tokenizer
    from puzzle.schema import FFNConfig, blocks_from_list
    from puzzle.scoring.context import context_scores
    from puzzle.search import resolve
    from puzzle.search.context import StageContext
    from puzzle.search.finalists import measure, measure_finalists, parent_logprobs
    from puzzle.search.refine import refine
    from solvers import Budget
    from solvers.diverse import diverse_solutions
    from solvers.io import problem_from_tables

    torch.manual_seed(0)
    plan = resolve(search_config(quick, preset, 0, str(run_dir.parent / "parent") if quick else None))
    ctx = StageContext(plan, run_dir, False)
    lib = open_library(run_dir / "library" / "lib")
    parent, tok = load_model(plan.model), load_tokenizer(plan.model)
    fin_ids, eval_ids = held_out(ctx, tok, 2 if quick else 4, 2 if quick else 8)
    fin_ref, eval_ref = parent_logprobs(parent, fin_ids), parent_logprobs(parent, eval_ids)
    uni = uniform_library(ctx, run_dir / "uniform_library", fractions)
    scores = pd.read_csv(run_dir / "score" / "scores" / "scores.csv")
    costs = pd.read_csv(run_dir / "profile" / "costs.csv")
    fixed = float(costs[costs.variant == "fixed"].params.sum())
    parent_decoder = float(costs[costs.is_parent.astype(bool)].params.sum())

    def eval_kl(labels: list[str]) -> float:
        from solvers.labels import block_dict

        child = lib.assemble(blocks_from_list([block_dict(b) for b in labels]))
        return measure(child, eval_ids, eval_ref)["kl"]

    budgets, children = [], []
    for r in fractions:
        blocks = [replace(b, ffn=FFNConfig.swiglu(uniform_width(uni, r))) for b in uni.parent_config.blocks]
        uniform = uni.assemble(blocks, initial=True)
        decoder = sum(p.numel() for layer in uniform.model.layers for p in layer.parameters())
        del uniform
        pct = 100.0 * decoder / parent_decoder
        problem = problem_from_tables(scores, costs, score_column="kl", budget=Budget(max_params=fixed + decoder))
        t0 = time.perf_counter()
        fin = measure_finalists(lib, parent, diverse_solutions(problem, k, min_fraction=0.1, backend=plan.value("solver")),
                                fin_ids, progress=progress)
        t_fin = time.perf_counter() - t0
        best = fin[0]
        only = {l: {f.solution.layer_labels()[l] for f in fin} for l in range(len(best.solution.layer_labels()))}
        cs = context_scores(lib, best.solution.layer_labels(), fin_ids, torch.cat(fin_ref), only=only,
                            progress=progress)
        rows = [{"flops_pct": round(pct, 1), "source": "finalist", "mip_rank": f.mip_rank,
                 "predicted_kl": f.solution.objective, "context_predicted_kl": cs.predict(f.solution.layer_labels()),
                 "finalist_kl": f.kl, "eval_kl": eval_kl(f.solution.layer_labels()),
                 "blocks": " ".join(f.solution.layer_labels())} for f in fin]
        df = pd.DataFrame(rows)
        out = {"flops_pct": round(pct, 1), "finalists": len(fin), "spearman_before": _rho(df, "predicted_kl", "eval_kl"),
               "spearman_after": _rho(df, "context_predicted_kl", "eval_kl"),
               "spearman_ceiling": _rho(df, "finalist_kl", "eval_kl"), "finalists_s": round(t_fin, 1),
               "context_swaps": len(cs.halves), "context_s": round(cs.seconds, 1)}
        for name, pool in (("first4", [f for f in fin if f.mip_rank < 4]), ("all", fin)):
            start = df.set_index("mip_rank").loc[pool[0].mip_rank, "eval_kl"]
            steps = refine(problem, lib, pool, fin_ids, fin_ref, rounds=rounds, backend=plan.value("solver"), progress=progress)
            found = [{"flops_pct": round(pct, 1), "source": f"refined_{name}", "mip_rank": s.finalist.mip_rank,
                      "round": s.round, "predicted_kl": s.finalist.solution.objective,
                      "context_predicted_kl": s.context_predicted_kl, "finalist_kl": s.finalist.kl,
                      "eval_kl": eval_kl(s.finalist.solution.layer_labels()), "seconds": round(s.seconds, 1),
                      "blocks": " ".join(s.finalist.solution.layer_labels())} for s in steps]
            rows += found
            chosen = min([pool[0].kl] + [x["finalist_kl"] for x in found])  # what a search would hand on
            picked = next((x["eval_kl"] for x in found if x["finalist_kl"] == chosen), start)
            out |= {f"{name}_start_eval_kl": start, f"{name}_refined_eval_kl": picked, f"{name}_rounds": len(found),
                    f"{name}_refine_s": round(sum(x["seconds"] for x in found), 1)}
        budgets.append(out)
        children += rows
        print(pd.DataFrame([out]).round(4).to_string(index=False), flush=True)
    return pd.DataFrame(budgets), pd.DataFrame(children)


def main() -> None:
    from benchmarks.quality import parse_fractions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random parent, tiny sizes (under a minute)")
    ap.add_argument("--run", default=None, help="a finished search (default runs/quality-PRESET-s0; quick: a temp dir)")
    ap.add_argument("--preset", default="quick", choices=["quick", "full"], help="the run's preset (default quick)")
    ap.add_argument("--fractions", default="0.75,0.5", help="FFN keep-ratios of the budgets (default 0.75,0.5)")
    ap.add_argument("--finalists", type=int, default=None, help="MIP solutions measured per budget (default 20)")
    ap.add_argument("--rounds", type=int, default=2, help="refinement rounds (default 2)")
    args = ap.parse_args()
    fractions = parse_fractions(args.fractions)
    if fractions is None:
        ap.error(f"--fractions must be comma-separated keep-ratios strictly between 0 and 1, got {args.fractions!r}")
    k = args.finalists if args.finalists is not None else (4 if args.quick else 20)
    if k < 1 or args.rounds < 0:
        ap.error("--finalists must be at least 1 and --rounds at least 0")
    t0 = time.perf_counter()
    if args.quick:
        from benchmarks.quality import search_config
        from benchmarks.tiny_parent import write_tiny_parent
        from puzzle.search import search

        run_dir = Path(args.run or Path(tempfile.mkdtemp(prefix="puzzle-refine-")) / "run")
        if not (run_dir.parent / "parent").exists():
            write_tiny_parent(run_dir.parent / "parent")
        search(search_config(True, "quick", 0, str(run_dir.parent / "parent")), run_dir, progress=False)
    else:
        run_dir = Path(args.run or f"runs/quality-{args.preset}-s0")
        if not (run_dir / "score" / "stage.json").is_file():
            ap.error(f"{run_dir} holds no finished search: run benchmarks/quality.py --preset {args.preset} first")
    budgets, children = study(run_dir, quick=args.quick, preset=args.preset, fractions=fractions, k=k,
                              rounds=args.rounds, progress=not args.quick)
    from puzzle.io import atomic_write_text

    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    budgets.insert(0, "preset", "quick-test" if args.quick else args.preset)
    atomic_write_text(RESULTS / f"refine{suffix}.csv", budgets.to_csv(index=False))
    atomic_write_text(RESULTS / f"refine_children{suffix}.csv", children.to_csv(index=False))
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(budgets.round(4).to_string(index=False))
    print(f"wrote {RESULTS / f'refine{suffix}.csv'} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
