"""The search's child under torchrun: ``puzzle search`` on several ranks, measured as ``quality.py`` measures.

    python benchmarks/quality.py --ranks 2 [--preset full] [--quick]

For every FFN keep-ratio of ``--fractions`` the budget is the same parameter count as ``quality.py``'s
(the parent with every FFN pruned to the ratio: 81.3% and 62.5% of SmolLM2's decoder at 0.75 and 0.5),
given to the search as ``--constraint 'total(params) <= N'`` (``--speedup 1``: the parameter budget binds).
One run directory serves every budget: the library (BLD, scores, costs) is built once and each new budget
re-solves, measures its finalists layer-sharded and runs child-aware BLD with the child-stream refit
layer-sharded (``--cluster Nxcpu``: every quality stage on every rank). GKD and fusion are off, as in
``quality.py``: what is compared is the child before GKD.

Each child is then measured in one process on the same held-out validation sequences as ``quality.py``'s
rows (after the :data:`RESERVED` ones that the search's evaluation and finalists read), against the same
parent. Rows: ``puzzle_search`` (the finalist the search chose, before child-aware BLD) and
``puzzle_search_child_bld`` (the child the search hands to fusion and GKD), with ``ranks`` = N.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def budget_params(config: Any, r: float) -> tuple[int, float]:
    """(total parameters, % of the parent's decoder) of the parent with every FFN pruned to ``r`` of its width:
    the cost table's counts (:mod:`puzzle.profiler.counts`), as ``quality.py`` sizes its budgets."""
    from dataclasses import replace

    from puzzle.profiler.counts import ModelShape, block_params, fixed_params
    from puzzle.schema import FFNConfig

    shape = ModelShape.from_config(config)
    parent = config.blocks
    width = round(r * parent[0].ffn.intermediate_size)
    pruned = [replace(b, ffn=FFNConfig.swiglu(width)) for b in parent]
    decoder = sum(block_params(shape, b) for b in pruned)
    return fixed_params(shape) + decoder, 100.0 * decoder / sum(block_params(shape, b) for b in parent)


def search_flags(quick: bool, preset: str, seed: int, child_refit: bool) -> list[str]:
    """``puzzle search`` flags of the run (the quick ones: ``quality.py --quick``'s tiny sizes)."""
    flags = ["--budget", "cpu", "--speedup", "1", "--fuse-threshold", "0", "--gkd-steps", "0", "--no-speed",
             "--seed", str(seed), "--no-progress", "--child-refit" if child_refit else "--no-child-refit"]
    if quick:
        return flags + ["--no-calibrate", "--batch", "2", "--context", "64", "--bld-tokens", "4096",
                        "--score-sequences", "1", "--score-seq-len", "32", "--engine", "transformers",
                        "--finalists", "2", "--child-bld-tokens", "1024", "--eval-sequences", "2",
                        "--bld-eval-sequences", "2"]
    return flags + ["--preset", preset]


def run_search(model: str, out: Path, ranks: int, max_params: int, flags: list[str], log: Path) -> float:
    """One ``puzzle search`` under torchrun at a parameter budget; its output goes to ``log``. Returns seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "puzzle.cli.main", "search", "--model", model, "--out", str(out), "--cluster", f"{ranks}xcpu",
           "--constraint", f"total(params) <= {max_params}", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or ranks) // ranks))}
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the search failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def reference(model: str, finalist_sequences: int, eval_sequences: int) -> tuple[Any, Any]:
    """(evaluation ids, the parent's log-probs on them): ``quality.py``'s held-out sequences (after the
    :data:`~benchmarks.quality.RESERVED` ones and the finalists' of its ``held_out``)."""
    from benchmarks.quality import RESERVED
    from puzzle.loading import load_model, load_tokenizer
    from puzzle.search.finalists import finalist_ids, parent_logprobs

    ids = finalist_ids(["stdlib"], load_tokenizer(model), skip=RESERVED, sequences=finalist_sequences + eval_sequences)
    eval_ids = ids[finalist_sequences:]
    return eval_ids, parent_logprobs(load_model(model), eval_ids)


def child_rows(run_dir: Path, budget: dict[str, Any], eval_ids: Any, eval_ref: Any) -> list[dict[str, Any]]:
    """The finished search in ``run_dir``: its chosen finalist (``solve/blocks.json``, assembled from the library)
    and its child after child-aware BLD (``child_bld/child``), measured on ``eval_ids``."""
    import json

    from benchmarks.quality import _q
    from block_library import open_library
    from puzzle.loading import load_model
    from puzzle.schema import load_blocks
    from puzzle.search.finalists import measure

    def seconds(stage: str) -> float:
        return float(json.loads((run_dir / stage / "stage.json").read_text()).get("seconds", float("nan")))

    solution = json.loads((run_dir / "solve" / "solution.json").read_text())
    blocks = load_blocks(run_dir / "solve" / "blocks.json")
    finalist = open_library(run_dir / "library" / "lib").assemble(blocks)
    ranks = budget["ranks"]
    rows = [{**budget, "method": "puzzle_search", **_q(measure(finalist, eval_ids, eval_ref)),
             "predicted_kl": solution.get("objective"),
             "detail": f"{ranks}-rank search's choice (solve stage {seconds('solve'):.0f} s): "
                       + " ".join(b.label for b in blocks)}]
    del finalist
    child = load_model(run_dir / "child_bld" / "child")
    rows.append({**budget, "method": "puzzle_search_child_bld", **_q(measure(child, eval_ids, eval_ref)),
                 "predicted_kl": solution.get("objective"),
                 "detail": f"{ranks}-rank search's child_bld stage ({seconds('child_bld'):.0f} s)"})
    print(f"  {budget['flops_pct']}% of the decoder: KL {rows[0]['kl']:.4f} (chosen finalist) -> {rows[1]['kl']:.4f} "
          f"(after child-aware BLD) on {ranks} ranks", flush=True)
    return rows


def sharded_rows(run_dir: Path, *, model: str, quick: bool, preset: str, label: str, seed: int, ranks: int,
                 fractions: list[float], child_refit: bool, finalist_sequences: int,
                 eval_sequences: int) -> list[dict[str, Any]]:
    """``quality.csv`` rows of the search run on ``ranks`` processes, one budget after the other (each budget's
    child is measured before the next budget's search replaces it)."""
    from puzzle.loading import load_config

    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    config = load_config(model)
    eval_ids, eval_ref = reference(model, finalist_sequences, eval_sequences)
    flags = search_flags(quick, preset, seed, child_refit)
    rows: list[dict[str, Any]] = []
    for r in fractions:
        max_params, pct = budget_params(config, r)
        run_search(model, run_dir, ranks, max_params, flags, log)
        rows += child_rows(run_dir, {"preset": label, "seed": seed, "gkd": False, "ranks": ranks,
                                     "budget": f"flops={pct / 100:.3f}", "flops_pct": round(pct, 1)}, eval_ids, eval_ref)
    return rows
