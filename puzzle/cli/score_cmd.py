"""``puzzle score``: replace-1-block scores of every (layer, block) of a block library.

    puzzle score runs/lib --out runs/scores                       # additive pairs, 8 x 256 held-out tokens
    puzzle score runs/lib --out runs/scores --pairs exact --sequences 16 --data corpus/
    puzzle solve --scores runs/scores/scores.csv --costs costs.csv --score-column kl ...

Rerunning resumes an interrupted run (finished layers are kept) and does nothing on a finished
one; a changed library or data is an error unless ``--force``.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="replace-1-block scores (KL, loss delta, top-1) of a block library",
                       description="Run the parent once on held-out tokens, then for every layer and every block "
                       "variant of the library measure the parent with only that block replaced: mean per-token "
                       "KL(parent || child), LM-loss delta and top-1 agreement. Writes scores.csv (the table "
                       "`puzzle solve` reads), subblock_scores.csv and manifest.json; resumable.")
    p.add_argument("library", help="a block library directory (`puzzle library build`)")
    p.add_argument("--out", required=True, help="scores directory to create or resume (never inside the library)")
    p.add_argument("--data", nargs="+", default=["stdlib"], help="held-out corpus sources: stdlib, text files, "
                   "directories, .jsonl, .parquet; their validation split is read (default: stdlib)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per held-out sequence (default: 256)")
    p.add_argument("--sequences", type=int, default=8, help="held-out sequences (default: 8)")
    p.add_argument("--pairs", choices=["additive", "exact"], default="additive",
                   help="additive: measure each sub-block variant with the parent's other half and sum the two "
                   "halves' scores for blocks where both differ; exact: measure every attention x FFN block "
                   "(default: additive)")
    p.add_argument("--initial", action="store_true", help="score the variants as initialized, before BLD")
    p.add_argument("--variant-batch", type=int, default=1, help="replacements of a layer stacked along the batch "
                   "(default 1: on CPU stacking was not faster)")
    p.add_argument("--force", action="store_true", help="recompute even if --out holds scores of other inputs")
    p.add_argument("--layer", type=int, help="print only this layer's rows (all layers are scored)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from puzzle.scoring import ScoreConfig, score_library
    from puzzle.scoring.tables import cost_line, format_subblocks

    cfg = ScoreConfig(sources=tuple(args.data), seq_len=args.seq_len, num_sequences=args.sequences,
                      pairs=args.pairs, initial=args.initial, variant_batch=args.variant_batch)
    result = score_library(args.library, args.out, cfg, force=args.force, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 prints the tables
        return 0
    m = result.manifest
    print(format_subblocks(result.subblocks, layer=args.layer))
    t = m["tokens"]
    print(f"{result.directory}: {len(result.scores)} blocks over {result.scores.layer.nunique()} layers "
          f"({m['library']['weights']} weights, pairs {m['config']['pairs']}, {t['scored_positions']} scored tokens)")
    print(cost_line(m) + (" (already complete: nothing ran now)" if result.reused else ""))
    return 0
