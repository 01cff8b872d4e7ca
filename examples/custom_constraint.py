"""A search with custom MIP constraints, from Python: pin layers, keep attention, cap parameters.

    python examples/custom_constraint.py                      # SmolLM2-135M, quick preset (~10 min on 2 cores)
    python examples/custom_constraint.py --model DIR --small  # any parent, tiny stage sizes (a smoke run)
        [--keep-first 1] [--keep-last 2] [--min-attention N] [--block-params 0.85] [--speedup 1.5] [--out DIR]

The MIP picks one block variant per layer to minimize the summed replace-1-block KL under the
speedup budget; constraints, written in the solvers' small language (``solvers/parse.py``), narrow
what it may pick. Here the child must keep the parent's first and last layers unchanged, keep
attention in at least ``--min-attention`` layers, and keep at most ``--block-params`` of the
parent's decoder-layer parameters. The script prints the chosen block per layer and re-checks
every constraint on the result, independently of the solver's own verification.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import puzzle
from puzzle.errors import PuzzleError
from puzzle.loading import load_config
from puzzle.model import PuzzleConfig
from puzzle.schema import BlockConfig, load_blocks
from puzzle.search import SearchRun
from puzzle.summary import totals

# Stage sizes of --small: a few hundred tokens per stage, seconds each on a tiny parent.
SMALL = dict(budget="8xH100", bld_tokens=4 * 8 * 256, score_sequences=1, score_seq_len=32, fuse_sequences=1,
             fuse_distill_steps=2, gkd_steps=0, gkd_batch=1, eval_sequences=1, measure_speed=False,
             engine="transformers")  # a tiny parent's FFN widths are no multiples of 256: only transformers loads them


def pinned_layers(n_layers: int, keep_first: int, keep_last: int) -> list[int]:
    """The layers that must stay the parent's: the first ``keep_first`` and the last ``keep_last``."""
    return sorted(set(range(min(keep_first, n_layers))) | set(range(max(0, n_layers - keep_last), n_layers)))


def constraints(parent: PuzzleConfig, *, keep_first: int, keep_last: int, min_attention: int,
                block_params: float) -> list[str]:
    """The constraints, as text (what ``puzzle search --constraint`` takes too)."""
    t = totals(parent)
    pinned = pinned_layers(parent.num_hidden_layers, keep_first, keep_last)
    # total(params) counts the chosen blocks plus the fixed embeddings / LM head / final norm.
    max_params = t.embedding_params + int(block_params * t.block_params)
    return ([f"layer[{i}] == parent" for i in pinned]                  # these layers stay exactly the parent's
            + [f"count(attention != no_op) >= {min_attention}",       # attention (any kind) in >= N layers
               f"total(params) <= {max_params}"])                     # a parameter cap


def violations(parent: PuzzleConfig, child: Sequence[BlockConfig], *, keep_first: int, keep_last: int,
               min_attention: int, block_params: float) -> list[str]:
    """Each constraint the child breaks, recomputed from its block configs (empty: all hold)."""
    t = totals(parent)
    out = [f"layer {i} is {child[i].label}, not the parent's {parent.blocks[i].label}"
           for i in pinned_layers(len(child), keep_first, keep_last) if child[i] != parent.blocks[i]]
    n_attention = sum(b.attention.kind != "no_op" for b in child)
    if n_attention < min_attention:
        out.append(f"{n_attention} attention layers < {min_attention}")
    params = totals(parent.with_blocks(list(child))).params
    if params > t.embedding_params + block_params * t.block_params:
        out.append(f"{params} params > the cap")
    return out


def search(args: argparse.Namespace) -> tuple[SearchRun, list[BlockConfig]]:
    """Run the search with the constraints; return the run and the solve stage's chosen blocks."""
    parent = load_config(args.model)
    texts = constraints(parent, keep_first=args.keep_first, keep_last=args.keep_last,
                        min_attention=args.min_attention, block_params=args.block_params)
    sizes = SMALL if args.small else {}
    run = puzzle.search(run_dir=args.out, model=args.model, speedup=args.speedup, constraints=texts,
                        progress=not args.small, echo=print, **sizes)
    return run, load_blocks(run.stages["solve"].outputs["blocks"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="parent: embedded name or model directory")
    ap.add_argument("--small", action="store_true", help="tiny stage sizes (for a tiny parent; not a real search)")
    ap.add_argument("--out", default="runs/custom_constraint", help="run directory (reruns skip finished stages)")
    ap.add_argument("--keep-first", type=int, default=1, help="leading layers kept as the parent's (default 1)")
    ap.add_argument("--keep-last", type=int, default=2, help="trailing layers kept as the parent's (default 2)")
    ap.add_argument("--min-attention", type=int, default=None,
                    help="layers that keep attention (default: two thirds of the layers)")
    ap.add_argument("--block-params", type=float, default=0.85,
                    help="max share of the parent's decoder-layer parameters (default 0.85)")
    ap.add_argument("--speedup", type=float, default=None, help="min predicted decode speedup on 8xH100 "
                    "(default 1.5; 1.2 with --small)")
    args = ap.parse_args(argv)
    if args.min_attention is None:
        args.min_attention = 2 * load_config(args.model).num_hidden_layers // 3
    if args.speedup is None:
        args.speedup = 1.2 if args.small else 1.5
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run, child = search(args)
    except PuzzleError as e:  # e.g. InfeasibleBudgetError: the message says which constraint is out of reach
        print(f"error: {e}", file=sys.stderr)
        return 2
    parent = load_config(args.model)
    pinned = pinned_layers(len(child), args.keep_first, args.keep_last)
    print(f"\n{'layer':>5}  {'parent':<22}  {'child':<22}")
    for i, (p, c) in enumerate(zip(parent.blocks, child)):
        print(f"{i:>5}  {p.label:<22}  {c.label:<22}{'  (pinned)' if i in pinned else ''}")
    broken = violations(parent, child, keep_first=args.keep_first, keep_last=args.keep_last,
                        min_attention=args.min_attention, block_params=args.block_params)
    print(f"\nconstraints hold: {not broken}" + "".join(f"\n  - {b}" for b in broken))
    t = run.stages["solve"].outputs["totals"]
    print(f"predicted: {t['speedup']:.3f}x decode speedup, {t['params'] / 1e6:.2f}M params\nchild: {run.export_dir}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
