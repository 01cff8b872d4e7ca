"""Block-wise local distillation speed and memory on SmolLM2-135M (default search space).

    python benchmarks/bld.py [--quick] [--tokens 16384] [--model smollm2-135m] [--device auto]

Builds a library of the default search space (every layer: 3 attention + 7 FFN variants to
train), then trains it for ``--tokens`` tokens and reports BLD throughput (tokens of the corpus
per second; every token trains every variant of every layer), peak memory (process RSS on CPU,
``max_memory_allocated`` on GPU) the build time, and the median final / initial validation NMSE per family. ``--quick`` keeps variants on layers 0-3
only (the others keep the parent's blocks) and trains 2048 tokens: under a minute.
Prints a table and writes benchmarks/results/bld.csv.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bld.csv"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="variants on 4 layers, 2048 tokens (under a minute)")
    ap.add_argument("--tokens", type=int, default=16384, help="BLD training tokens (default 16384)")
    ap.add_argument("--model", default="smollm2-135m", help="parent: embedded name or directory")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where BLD runs")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences of 256 tokens per step")
    args = ap.parse_args(argv)

    from block_library import LibraryConfig, build_library, open_library, train_library
    from puzzle.loading import load_config

    n_layers = load_config(args.model).num_hidden_layers
    space: dict = {}
    tokens = args.tokens
    if args.quick:
        space = {"overrides": [{"layers": f"4-{n_layers - 1}", "attention": ["parent"], "ffn": ["parent"]}]}
        tokens = 2048
    cfg = LibraryConfig.from_dict({"space": space, "bld": {
        "tokens": tokens, "batch_size": args.batch_size, "device": args.device, "checkpoint_every": 0,
        "calib_sequences": 4 if args.quick else 16, "val_sequences": 4 if args.quick else 16}})
    cuda = torch.cuda.is_available() and args.device != "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        lib_dir = build_library(args.model, Path(tmp) / "lib", cfg, progress=False)
        build_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        train_library(lib_dir, progress=False)
        lib = open_library(lib_dir)
        bld = lib.manifest["bld"]
        t = lib.table
        trained = t[t.trained.astype(bool)]
        improved = int((trained.final_val_nmse < trained.init_val_nmse).sum())
        ratio = trained.final_val_nmse / trained.init_val_nmse
        family = trained.variant.str.split(":").str[0]  # gqa, swiglu, linear
        by_family = {f"nmse_ratio_{f}": round(float(r.median()), 4) for f, r in ratio.groupby(family)}
    if cuda:
        device, peak = torch.cuda.get_device_name(), torch.cuda.max_memory_allocated() / 2**30
    else:
        device, peak = f"cpu ({torch.get_num_threads()} threads)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = {
        "device": device, "model": args.model, "layers_with_variants": 4 if args.quick else n_layers,
        "variants_trained": len(trained), "tokens": bld["tokens"], "steps": bld["steps"],
        "tokens_per_s": round(bld["tokens"] / bld["seconds_this_run"], 1),
        "variant_tokens_per_s": round(bld["tokens"] * len(trained) / bld["seconds_this_run"], 0),
        "peak_mem_gib": round(peak, 2), "build_s": round(build_s, 1), "train_s": round(bld["seconds_this_run"], 1),
        "improved": f"{improved}/{len(trained)}",
        "median_nmse_init": round(float(trained.init_val_nmse.median()), 5),
        "median_nmse_final": round(float(trained.final_val_nmse.median()), 5),
        **by_family,
        "quick": args.quick,
    }
    df = pd.DataFrame([row])
    print(df.T.to_string(header=False))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(RESULTS, index=False)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
