"""Predicted vs measured child/parent speedup for several MIP solutions on the present device.

    python benchmarks/realized_speedup.py [--quick] [--scores runs/search/score/scores/scores.csv]
                                          [--speedups 1.25,1.5,1.75,2.0] [--scenario decode] [--threads N]

The profiler predicts step times on this device (``cpu``, with its saved calibration if any, or
the GPU's datasheet target); the MIP picks children of SmolLM2-135M's default search space at
several predicted speedups; each child is then built with random weights of its exact shapes
(speed does not depend on weight values) and timed against the parent, interleaved, with the
lean runtime path (static KV cache, last-token logits). Scores are the real ones of a search run
(``--scores``) or a parameter-share proxy (say so: it only decides *which* child of each speedup).

Writes ``benchmarks/results/realized_speedup.csv``: solution, scenario, predicted_speedup,
measured_speedup, ratio (measured / predicted), parent and child ms predicted and measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from puzzle.loading import load_config
from puzzle.model import PuzzleForCausalLM
from puzzle.profiler.counts import ModelShape, block_params
from puzzle.profiler.hardware import parse_target
from puzzle.profiler.model_speed import measure_models_ms
from puzzle.profiler.roofline import model_ms
from puzzle.profiler.scenario import Scenario
from puzzle.profiler.table import cost_table, layer_candidates
from puzzle.schema import blocks_from_list
from solvers import Budget, solve
from solvers.io import problem_from_tables

RESULTS = Path(__file__).parent / "results"


def proxy_scores(costs: pd.DataFrame, shape: ModelShape, candidates) -> pd.DataFrame:  # noqa: ANN001
    """Score = share of the parent block's parameters removed (a stand-in for a quality loss)."""
    rows = []
    for layer, blocks in enumerate(candidates):
        full = block_params(shape, blocks[0])
        for b in blocks:
            rows.append({"layer": layer, "variant": b.label, "kl": (full - block_params(shape, b)) / full + 1e-6 * layer})
    return pd.DataFrame(rows)


def random_model(config, blocks, seed: int) -> PuzzleForCausalLM:  # noqa: ANN001
    torch.manual_seed(seed)
    return PuzzleForCausalLM(config.with_blocks(list(blocks))).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two solutions, short context (under a minute)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--target", default="cpu", help="profiler target to predict with (default: cpu = this machine)")
    ap.add_argument("--scores", help="a search run's scores.csv (default: parameter-share proxy scores)")
    ap.add_argument("--speedups", default=None, help="comma-separated predicted speedups (default 1.25,1.5,1.75,2.0)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=None, help="decode context / prompt length (default 1024; quick 256)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    context = args.context or (256 if args.quick else 1024)
    speedups = [float(s) for s in (args.speedups or ("1.5,2.0" if args.quick else "1.25,1.5,1.75,2.0")).split(",")]
    scenarios = [Scenario(name="decode", phase="decode", batch=args.batch, length=context),
                 Scenario(name="prefill", phase="prefill", batch=1, length=context)]
    target = parse_target(args.target)
    config = load_config(args.model)
    shape = ModelShape.from_config(config)
    _, candidates = layer_candidates(args.model)
    costs = cost_table(shape, candidates, config.blocks, target=target, scenarios=scenarios)
    scores = pd.read_csv(args.scores) if args.scores else proxy_scores(costs, shape, candidates)
    parent = random_model(config, config.blocks, 0)
    rows = []
    for s in speedups:
        problem = problem_from_tables(scores, costs, score_column="kl", budget=Budget(speedup=s),
                                      scenario=scenarios[0])  # the decode step, the profiler's own Scenario
        blocks = blocks_from_list(solve(problem).block_configs())
        child = random_model(config, blocks, 1)
        for sc in scenarios:
            pred_p, pred_c = model_ms(shape, config.blocks, sc, target), model_ms(shape, blocks, sc, target)
            meas_p, meas_c = measure_models_ms([parent, child], sc, rounds=args.rounds, repeats=2)
            rows.append({"solution": f"speedup>={s}", "scenario": sc.name, "predicted_speedup": pred_p / pred_c,
                         "measured_speedup": meas_p / meas_c, "ratio": (meas_p / meas_c) / (pred_p / pred_c),
                         "parent_pred_ms": pred_p, "child_pred_ms": pred_c, "parent_meas_ms": meas_p,
                         "child_meas_ms": meas_c, "child_layers_attention": sum(b.attention.kind == "gqa" for b in blocks),
                         "child_params_m": sum(p.numel() for p in child.parameters()) / 1e6})
            print(f"{rows[-1]['solution']:>14} {sc.name:>7}: predicted {rows[-1]['predicted_speedup']:.3f}x, "
                  f"measured {rows[-1]['measured_speedup']:.3f}x ({rows[-1]['ratio']:.0%} of predicted)", flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 220, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / "realized_speedup.csv", index=False)
    print(f"\nscores: {'real (' + args.scores + ')' if args.scores else 'parameter-share proxy'}; target {target.name}; "
          f"wrote {RESULTS / 'realized_speedup.csv'} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
