"""Fair controls for the full preset's search quality: uniform FFN pruning given the same child-stream refit and
child-aware BLD as the search's child, at the same decoder FLOPs, on the same held-out tokens.

    python benchmarks/quality_controls.py                      # full preset, 81% and 62.5% (about 40 min on 2 cores)
    python benchmarks/quality_controls.py --fractions 0.75 --child-bld-tokens 4096 --seed 0
    python benchmarks/quality_controls.py --quick              # a tiny random parent, under a minute

``benchmarks/quality.py --preset full --child-refit`` measured the search's child after the child-stream refit and
child-aware BLD (131,072 tokens) against *untrained* uniform pruning (``--no-controls``: the controls' training
takes 20 minutes a budget). This script adds the missing controls without the search: for every FFN keep-ratio
``r`` (0.75 and 0.5: 81% and 62.5% of SmolLM2's decoder FLOPs) uniform pruning (the channels the FFN initializer
keeps) gets the refit (``uniform_ffn_child_refit``) and then child-aware BLD (``uniform_ffn_child_bld``), with
quality.py's settings: the preset's training tokens at 256 tokens a sequence, read where the search's child_bld
stage reads them, and KL to the parent on quality.py's 8 x 256 held-out validation tokens. ShortGPT's children
only remove blocks (no-ops): child-aware BLD has nothing of theirs to train, so its rows stand as measured.

Writes its rows into ``benchmarks/results/quality.csv`` under the preset label quality.py gives (``full+child-refit``),
replacing only earlier rows of the same methods, budgets and seed (``--quick``: ``quality_controls_quick.csv``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's root: benchmarks.quality

from benchmarks.quality import (COLUMNS, RESULTS, _q, _with_refit, held_out, search_config,  # noqa: E402
                                uniform_library, uniform_width)

METHODS = ("uniform_ffn_child_refit", "uniform_ffn_child_bld")


def controls(run_dir: Path, *, quick: bool, preset: str, seed: int, fractions: list[float], tokens: int,
             label: str) -> pd.DataFrame:
    """The control rows: uniform pruning at each keep-ratio, refit, then child-aware BLD (one process)."""
    import torch

    from puzzle.distill.child_bld import ChildBLDConfig, train_child_blocks
    from puzzle.distill.child_refit import refit_child_ffns
    from puzzle.loading import load_model, load_tokenizer
    from puzzle.schema import FFNConfig
    from puzzle.search import resolve
    from puzzle.search.context import StageContext
    from puzzle.search.finalists import measure, parent_logprobs
    from puzzle.search.stages.child_bld import training_ids

    torch.manual_seed(seed)
    plan = resolve(search_config(quick, preset, seed, str(run_dir / "parent") if quick else None))
    ctx = StageContext(plan, run_dir, False)
    parent, tok = load_model(plan.model), load_tokenizer(plan.model)
    _, eval_ids = held_out(ctx, tok, 2 if quick else 4, 2 if quick else 8)  # quality.py's evaluation tokens
    reference = parent_logprobs(parent, eval_ids)
    uni = uniform_library(ctx, run_dir / "uniform_library", fractions)
    cfg = ChildBLDConfig(tokens=tokens, seed=seed, refit=True)  # 256 tokens a sequence, as quality.py's rows
    ids = training_ids(plan, tok, cfg)
    parent_decoder = sum(p.numel() for layer in parent.model.layers for p in layer.parameters())
    rows = []
    for r in fractions:
        blocks = [replace(b, ffn=FFNConfig.swiglu(uniform_width(uni, r))) for b in uni.parent_config.blocks]
        model = uni.assemble(blocks, initial=True)
        decoder = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
        pct = 100.0 * decoder / parent_decoder
        budget = {"preset": label, "seed": seed, "ranks": 1, "gkd": False, "budget": f"flops={pct / 100:.3f}",
                  "flops_pct": round(pct, 1)}
        what = f"every FFN {blocks[0].ffn.label}"
        s = refit_child_ffns(model, parent, ids[:cfg.steps * cfg.step_batch], ridge=cfg.refit_ridge,
                             drift=cfg.refit_drift, batch=cfg.batch).summary()
        refit = {**_q(measure(model, eval_ids, reference)), "detail": f"{what}; child-stream refit: "
                 f"{s['refit_layers']} FFNs, {s['refit_tokens']} tokens, {s['refit_seconds']:.0f} s"}
        t = train_child_blocks(model, parent, ids, replace(cfg, refit=False))
        rows += _with_refit({**budget, "method": "uniform_ffn_child_bld", **_q(measure(model, eval_ids, reference)),
                             "refit": refit, "detail": f"{what}; child-aware BLD: {len(t.trained)} sub-blocks, "
                                                       f"{t.tokens} tokens, {t.seconds:.0f} s, after the child-stream refit"})
        print(pd.DataFrame(rows)[["method", "budget", "kl", "ppl", "top1"]].tail(2).round(4).to_string(index=False),
              flush=True)
        del model
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def merged(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """``path``'s rows with ``new``'s in place of the rows of the same preset, seed, budget and method."""
    if not path.is_file():
        return new
    old = pd.read_csv(path)
    key = ["preset", "seed", "budget", "method"]
    keep = ~old.set_index(key).index.isin(new.set_index(key).index)
    return pd.concat([old[keep], new], ignore_index=True).reindex(columns=list(old.columns))


def main(argv: list[str] | None = None) -> int:
    from puzzle.search.config import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny random parent, tiny sizes (under a minute)")
    ap.add_argument("--preset", default="full", choices=["quick", "full"], help="stage sizes (default full)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fractions", default="0.75,0.5", help="FFN keep-ratios (default 0.75,0.5: 81%% and 62.5%%)")
    ap.add_argument("--child-bld-tokens", type=int, default=None, help="default: the preset's (full 131,072)")
    args = ap.parse_args(argv)
    from benchmarks.quality import parse_fractions
    from benchmarks.tiny_parent import write_tiny_parent

    fractions = parse_fractions(args.fractions)
    if fractions is None:
        ap.error(f"--fractions must be comma-separated keep-ratios strictly between 0 and 1, got {args.fractions!r}")
    if args.child_bld_tokens is not None and args.child_bld_tokens < 1:
        ap.error(f"--child-bld-tokens must be at least 1, got {args.child_bld_tokens}")
    tokens = args.child_bld_tokens or (1024 if args.quick else PRESETS[args.preset]["child_bld_tokens"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        if args.quick:
            write_tiny_parent(run_dir / "parent")
        label = ("quick-test" if args.quick else args.preset) + "+child-refit"
        df = controls(run_dir, quick=args.quick, preset=args.preset, seed=args.seed, fractions=fractions,
                      tokens=tokens, label=label)
    from puzzle.io import atomic_write_text

    path = RESULTS / ("quality_controls_quick.csv" if args.quick else "quality.csv")
    atomic_write_text(path, (df if args.quick else merged(path, df)).to_csv(index=False))
    print(df.drop(columns=["detail"]).round(4).to_string(index=False))
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
