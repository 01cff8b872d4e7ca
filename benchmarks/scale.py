"""The plan against a run: a whole search of a Llama-3.2-1B-shaped parent under 2-process torchrun.

    python benchmarks/scale.py            # 1.24 B random parent, 2 ranks of 6 GiB (about an hour on 2 cores)
    python benchmarks/scale.py --quick    # a small shape of the same family, 2 ranks of 2.5 GiB, every quality
                                          # stage at the budget's 1024 tokens (a few minutes)

Writes a random parent of the shape (``benchmarks/random_parent.py``, cached under the puzzle
cache), then runs

    torchrun --nproc-per-node 2 -m puzzle.cli.main search --model DIR --cluster 2xcpu \\
        --max-memory-per-rank 6GiB --budget 8xH100 --fuse-threshold 0 --gkd-steps 4 --gkd-batch 2 --no-speed \\
        --space SPACE.yaml --engine transformers --bld-tokens 2048 --bld-eval-sequences 4 --finalists 4 \\
        --child-bld-tokens 2048 --child-refit --quality-context 256 --score-seq-len 64 ...

and reads the run's ``resources.csv``: for every stage and rank the plan's predicted peak RSS and
time beside the measured ones (``puzzle.peak``: the high-water mark of each rank, reset before
each stage). Prints the table, writes ``benchmarks/results/scale.csv`` (``scale_quick.csv`` with
``--quick``) and exits 1 when a rank exceeds ``--max-memory-per-rank`` or a stage's measured
peak is off the plan by more than ``--tolerance`` (15%).

Every quality stage runs sharded: the 4 finalists measured layer-sharded against the parent's cached
top-1024 log-probabilities, child-aware BLD with the child-stream refit layer-sharded, and GKD (4 steps of
2 sequences; 2 with ``--quick``) from the parent's top-64 targets of its training and validation sequences,
computed layer-sharded once, so no rank loads the parent in training. The whole 1B student does not fit
6 GiB a rank: FSDP2 holds 16 B per trained parameter (fp32 weight, gradient, two AdamW moments) over the
ranks, 6.8 GB a rank for the child's 848 M before any layer is gathered or any logit computed. The plan
falls back (``memory_options`` in ``puzzle/search/stages/gkd.py``) to training the child's
replaced sub-blocks alone (38 M parameters here), the rest frozen at 4 B a parameter, and its ``how``
column says so; ``--quick``'s small shape trains every weight. Fusion runs only on GPU budgets' children
(``--fuse-threshold 0`` here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
QUICK_SHAPE = {"base": "llama-3.2-1b", "num_hidden_layers": 4, "hidden_size": 512, "intermediate_size": 2048,
               "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 49152}
"""A small Llama-3.2 of the same family: 4 layers, hidden 512 (40 M parameters with its 49k vocabulary)."""
SPACE = {"attention": {"kv_heads": [2]}, "ffn": {"sizes": [0.5, 0.25]}}
"""A smaller search space than the default (8 trained variants a layer instead of 12): the 1B run's BLD
replays its teacher pass once per round, and on 2 CPU cores every round costs minutes."""


def parent_dir(shape: str | dict, seed: int = 0) -> Path:
    """The random parent of ``shape``, written once into the puzzle cache."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.random_parent import write_random_parent
    from puzzle.parents.embedded import cache_root

    tag = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
    out = cache_root() / "random_parents" / f"{shape if isinstance(shape, str) else 'custom'}-{tag}-s{seed}"
    if not (out / "config.json").is_file():
        write_random_parent(shape, out, seed=seed)
    return out


def run_search(model: Path, out: Path, *, ranks: int, memory: str, flags: list[str], timeout: float) -> float:
    """The search under torchrun; returns its wall time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "puzzle.cli.main", "search", "--model", str(model), "--out", str(out), "--cluster", f"{ranks}xcpu",
           "--max-memory-per-rank", memory, "--budget", "8xH100", "--fuse-threshold", "0", "--no-speed",
           "--no-progress", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or ranks) // ranks))}
    print("$", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout, text=True, capture_output=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the search failed (exit {proc.returncode})")
    return time.perf_counter() - t0


def search_setup(quick: bool, tmp: Path, *, memory: str | None = None) -> tuple[Path, str, list[str]]:
    """The parent, the memory per rank and the search flags of the full or ``quick`` run (writes the
    search-space file into ``tmp``)."""
    flags = ["--bld-tokens", "2048", "--bld-eval-sequences", "4", "--score-sequences", "1",
             "--eval-sequences", "2", "--finalists", "4", "--child-refit"]
    if quick:  # GKD from the parent's top-64 targets, computed layer-sharded once; every quality stage at the
        # default quality context, the budget's 1024 tokens
        model = parent_dir(QUICK_SHAPE)
        flags += ["--gkd-steps", "2", "--gkd-batch", "2", "--child-bld-tokens", "4096"]
    else:  # the same, training the replaced sub-blocks only: the plan's fallback at 6 GiB a rank (measured at 256
        # tokens a sequence, scoring at 64)
        model = parent_dir("llama-3.2-1b")
        flags += ["--gkd-steps", "4", "--gkd-batch", "2", "--gkd-top-k", "64", "--child-bld-tokens", "2048",
                  "--quality-context", "256", "--score-seq-len", "64"]
    space = tmp / "space.yaml"  # GQA with 2 KV heads, FFN widths 1/2 and 1/4, linear and no-op
    space.write_text(json.dumps({"space": SPACE}))
    # --engine transformers keeps the linear variants (vLLM's space drops them): memory is what is measured here
    return model, memory or ("2.5GiB" if quick else "6GiB"), flags + ["--space", str(space), "--engine", "transformers"]


def replanned(run: Path, usage: pd.DataFrame) -> pd.DataFrame:
    """The run's measured rows with today's plan beside them (``benchmarks/stage_times.py``'s :func:`replan`)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.stage_times import replan

    _, stages = replan(run)
    usage = usage.copy()
    for i, row in usage.iterrows():
        r = stages[row.stage].ranks[int(row["rank"])]
        usage.loc[i, ["predicted_peak_gib", "predicted_s"]] = r.device_bytes / 2**30, r.seconds
    return usage


def compare(usage: pd.DataFrame, limit_gib: float, tolerance: float) -> pd.DataFrame:
    """The resources table with the ratio measured / predicted and whether each row is within the plan."""
    df = usage[~usage.skipped.astype(bool)].copy()
    df["ratio"] = df.measured_peak_gib / df.predicted_peak_gib
    df["time_ratio"] = df.measured_s / df.predicted_s.where(df.predicted_s > 0)  # measured / predicted seconds
    df["idle"] = df.predicted_peak_gib <= df.predicted_peak_gib.min() + 1e-9  # the rank holds only its process
    df["within_plan"] = (df.ratio - 1).abs() <= tolerance
    df["within_limit"] = df.measured_peak_gib <= limit_gib
    return df[["stage", "rank", "predicted_peak_gib", "measured_peak_gib", "ratio", "predicted_s", "measured_s",
               "time_ratio", "rounds", "idle", "within_plan", "within_limit"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small shape, 2 ranks of 2.5 GiB: about 4 min on 2 cores")
    ap.add_argument("--ranks", type=int, default=2, help="torchrun processes (default 2)")
    ap.add_argument("--memory", help="--max-memory-per-rank (default 6GiB; 2.5GiB with --quick)")
    ap.add_argument("--tolerance", type=float, default=0.15, help="largest |measured / predicted - 1| (default 0.15)")
    ap.add_argument("--keep", type=Path, help="run directory to keep (default: a temporary one)")
    ap.add_argument("--out", type=Path, help="CSV path (default: benchmarks/results/scale[_quick].csv)")
    ap.add_argument("--run", type=Path, help="a finished run (--keep) to compare with today's plan, without running")
    args = ap.parse_args(argv)

    from puzzle.search.cluster import parse_size

    with tempfile.TemporaryDirectory() as tmp:
        model, memory, flags = search_setup(args.quick, Path(tmp), memory=args.memory)
        if args.run is not None:
            if not (args.run / "resources.csv").is_file():
                raise SystemExit(f"--run {args.run}: no resources.csv there; name a kept run (scale.py --keep DIR)")
            out, wall = args.run, float("nan")
            usage = replanned(out, pd.read_csv(out / "resources.csv"))
        else:
            out = args.keep or Path(tmp) / "run"
            wall = run_search(model, out, ranks=args.ranks, memory=memory, flags=flags,
                              timeout=1500 if args.quick else 4 * 3600)
            usage = pd.read_csv(out / "resources.csv")
    table = compare(usage, parse_size(memory) / 2**30, args.tolerance)
    path = args.out or RESULTS / ("scale_quick.csv" if args.quick else "scale.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    print(f"search wall time {wall:.0f} s on {args.ranks} ranks of {memory}; written {path}")
    bad = table[~(table.within_plan & table.within_limit)]
    if len(bad):
        print(f"{len(bad)} stage/rank rows are off the plan by more than {args.tolerance:.0%} or over {memory}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
