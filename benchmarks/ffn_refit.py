"""The least-squares refit of pruned FFNs (``bld.ffn_refit``) against the plain copy, on SmolLM2-135M, on this CPU.

    python benchmarks/ffn_refit.py [--quick] [--fractions 0.75,0.5,0.25] [--ridges 0.1] [--bld-tokens 4096]

For each FFN keep-ratio ``r``, the child with every FFN pruned to ``r`` of its width (the channels our FFN
initializer keeps) is built twice from the same calibration tokens (the library's: 16 x 256 from the train
split): with the kept channels' down projection copied, and refit by least squares to what the whole FFN
writes (:mod:`block_library.ffn`, each ``--ridges`` value). Each is measured untrained and again after library
BLD on ``--bld-tokens`` (default 4096: the quick preset's; 0 skips it), by its KL to the parent, top-1 agreement
and perplexity on 8 x 256 held-out validation tokens (the quality benchmark's, which no search reads) and its
mean validation NMSE per pruned FFN (the library's ``init_val_nmse`` / ``final_val_nmse``).

Columns: fraction, width, init (copy, or refit:RIDGE), bld_tokens, kl, top1, ppl, mean_nmse, build_s. Writes
``benchmarks/results/ffn_refit.csv``. ``--quick``: a random 3-layer parent with tiny sizes (under a minute; its
numbers mean nothing), written to ``results/ffn_refit_quick.csv``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's root: benchmarks.tiny_parent

from benchmarks.quality import RESERVED, uniform_width, parse_fractions  # noqa: E402
from benchmarks.tiny_parent import write_tiny_parent  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def parse_ridges(text: str) -> list[float] | None:
    """``0.001,0.01`` -> [0.001, 0.01]; None unless every value is a number > 0."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        return None
    return values if values and all(v > 0 for v in values) else None


def measure_uniform(lib: Any, fractions: list[float], ids: Any, reference: Any, *, initial: bool) -> dict[float, Any]:
    """Every FFN pruned to each fraction of the parent's width, from ``lib`` (its initial or trained weights)."""
    from dataclasses import replace

    from puzzle.schema import FFNConfig
    from puzzle.search.finalists import measure

    parent_blocks = lib.parent_config.blocks
    out = {}
    for r in fractions:
        width = uniform_width(lib, r)
        child = lib.assemble([replace(b, ffn=FFNConfig.swiglu(width)) for b in parent_blocks], initial=initial)
        out[r] = (width, measure(child, ids, reference))
        del child
    return out


def main() -> None:
    from block_library import LibraryConfig, build_library, open_library, train_library
    from puzzle.loading import load_model, load_tokenizer
    from puzzle.search.finalists import finalist_ids, parent_logprobs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random parent, tiny sizes (under a minute)")
    ap.add_argument("--fractions", default="0.75,0.5,0.25", help="FFN keep-ratios (default 0.75,0.5,0.25)")
    ap.add_argument("--ridges", default="0.1", help="relative ridge terms of the refit, towards the copy (default "
                    "0.1, bld.ffn_ridge's)")
    ap.add_argument("--bld-tokens", type=int, default=None, help="library BLD tokens after the initialization "
                    "(default 4096, the quick preset's; --quick: 512; 0: untrained only)")
    ap.add_argument("--out", default=None, help="directory of the libraries (default: a temp dir)")
    args = ap.parse_args()
    fractions, ridges = parse_fractions(args.fractions), parse_ridges(args.ridges)
    if fractions is None:
        ap.error(f"--fractions must be comma-separated keep-ratios strictly between 0 and 1, got {args.fractions!r}")
    if ridges is None:
        ap.error(f"--ridges must be comma-separated numbers > 0, got {args.ridges!r}")
    bld_tokens = args.bld_tokens if args.bld_tokens is not None else (512 if args.quick else 4096)
    if bld_tokens < 0:
        ap.error("--bld-tokens must be at least 0")
    out = Path(args.out or tempfile.mkdtemp(prefix="puzzle-ffn-refit-"))
    if out.exists() and any(p.name != "parent" for p in out.iterdir()):
        ap.error(f"--out {out} already holds files; choose an empty or new directory")
    source = str(write_tiny_parent(out / "parent")) if args.quick else "smollm2-135m"
    seq_len, calib = (64, 4) if args.quick else (256, 16)
    parent, tok = load_model(source), load_tokenizer(source)
    ids = finalist_ids(["stdlib"], tok, skip=RESERVED, sequences=2 if args.quick else 12)[-(2 if args.quick else 8):]
    reference = parent_logprobs(parent, ids)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for init in ["copy"] + [f"refit:{r:g}" for r in ridges]:
        refit = init != "copy"
        cfg = LibraryConfig.from_dict({
            "space": {"attention": {"kv_heads": [], "linear": False, "no_op": False},
                      "ffn": {"sizes": fractions, "multiple": 1 if not args.quick else 16, "linear": False, "no_op": False}},
            "bld": {"tokens": max(bld_tokens, 1), "batch_size": 8 if not args.quick else 2, "calib_sequences": calib,
                    "val_sequences": calib, "ffn_refit": refit, **({"ffn_ridge": float(init.split(":")[1])} if refit else {})},
            "data": {"sources": ["stdlib"], "seq_len": seq_len}})
        lib_dir = out / init.replace(":", "-")
        b0 = time.perf_counter()
        build_library(source, lib_dir, cfg, progress=not args.quick)
        build_s = time.perf_counter() - b0
        phases = [(0, True)] + ([(bld_tokens, False)] if bld_tokens else [])
        for tokens, initial in phases:
            if not initial:
                train_library(lib_dir, progress=not args.quick)
            lib = open_library(lib_dir)
            t = lib.table
            nmse_col = "init_val_nmse" if initial else "final_val_nmse"
            for r, (width, q) in measure_uniform(lib, fractions, ids, reference, initial=initial).items():
                nmse = t[t.variant == f"swiglu:{width}"][nmse_col].mean()
                rows.append({"fraction": r, "width": width, "init": init, "bld_tokens": tokens, "kl": q["kl"],
                             "top1": q["top1_agreement"], "ppl": q["ppl"], "mean_nmse": nmse, "build_s": round(build_s, 1)})
            print(pd.DataFrame(rows).tail(len(fractions)).round(4).to_string(index=False), flush=True)
    df = pd.DataFrame(rows)
    from puzzle.io import atomic_write_text

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("ffn_refit_quick.csv" if args.quick else "ffn_refit.csv")
    atomic_write_text(path, df.to_csv(index=False))
    print(df.round(4).to_string(index=False))
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
