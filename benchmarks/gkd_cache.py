"""GKD with a live parent against GKD on the parent's cached top-k targets, on SmolLM2-135M, on this CPU.

    python benchmarks/gkd_cache.py [--quick] [--steps 16] [--batch 2] [--top-k 64] [--children 4]

The child: SmolLM2 without the attention of six layers (the parent's other weights), the kind of child the
search and its attention-removal baseline hand to GKD. Both runs train it for the same steps on the same
sequences in the same order (the search's quick-preset GKD: 16 steps of 2 x 256 tokens) and report the exact
validation KL (8 held-out sequences, a live parent) before and after. The cached run first computes the
parent's targets once (:mod:`puzzle.distill.teacher_cache`): its time is reported apart, as the search pays it
once for the child and every baseline (``--children``: the projected time of that many GKD runs).

Columns: mode, top_k, steps, train_tokens, cache_s, cache_mb, train_s, train_tokens_per_s, kl_captured (the
share of the child's exact KL before training that the coarsened KL on the top k keeps), val_kl_before,
val_kl_after, children, children_s. Writes ``benchmarks/results/gkd_cache.csv``. ``--quick``: a random 3-layer
parent, 2 steps (under a minute; its numbers mean nothing), written to ``results/gkd_cache_quick.csv``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's root: benchmarks.tiny_parent

from benchmarks.tiny_parent import write_tiny_parent  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REMOVED = (3, 7, 11, 15, 19, 23)
"""Layers of SmolLM2 whose attention the child drops (the tiny parent: layer 1)."""


def main() -> None:
    import torch

    from puzzle.distill import GKDConfig, distill_child, gkd_train_ids, teacher_targets
    from puzzle.distill.losses import batch_losses
    from puzzle.distill.teacher_cache import cached_kl
    from puzzle.fusion.derive import derive_model, without_attention
    from puzzle.loading import load_model, load_tokenizer
    from puzzle.scoring.metrics import next_token_logprobs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random parent, 2 steps (under a minute)")
    ap.add_argument("--steps", type=int, default=None, help="GKD steps (default 16; --quick: 2)")
    ap.add_argument("--batch", type=int, default=2, help="sequences of 256 tokens per step (default 2)")
    ap.add_argument("--top-k", type=int, default=64, help="cached log-probabilities per token (default 64)")
    ap.add_argument("--children", type=int, default=4, help="GKD runs sharing one cache: the child and its "
                    "baselines (default 4)")
    args = ap.parse_args()
    steps = args.steps if args.steps is not None else (2 if args.quick else 16)
    if steps < 1 or args.batch < 1 or args.top_k < 1 or args.children < 1:
        ap.error("--steps, --batch, --top-k and --children must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="puzzle-gkd-cache-"))
    source = str(write_tiny_parent(tmp / "parent")) if args.quick else "smollm2-135m"
    parent, tok = load_model(source), load_tokenizer(source)
    layers = (1,) if args.quick else REMOVED
    child = derive_model(parent, without_attention(parent.config.blocks, layers))
    cfg = GKDConfig(steps=steps, batch=args.batch, val_sequences=2 if args.quick else 8, val_every=0,
                    checkpoint_every=0)
    ids = gkd_train_ids(cfg, tok)  # (steps x batch, 256)

    t0 = time.perf_counter()
    targets = teacher_targets(parent, ids, min(args.top_k, parent.config.vocab_size), tmp / "teacher.safetensors",
                              progress=True)
    cache_s = time.perf_counter() - t0
    with torch.no_grad():  # how much of the child's KL the top k keep, on the first step's sequences
        first = ids[:args.batch]
        exact = float(batch_losses(child, parent, first, cfg, [(len(child.model.layers), len(parent.model.layers))])["kl"])
        q = next_token_logprobs(child(input_ids=first).logits)
        coarse = float(cached_kl(q, targets.rows(torch.arange(args.batch)))) / (first.shape[0] * (first.shape[1] - 1))

    rows = []
    for mode in ("live", "cached"):
        t0 = time.perf_counter()
        r = distill_child(child, parent, tok, tmp / mode, cfg, progress=True,
                          teacher=targets if mode == "cached" else None)
        train_s = time.perf_counter() - t0
        per_child = train_s
        total = args.children * per_child + (cache_s if mode == "cached" else 0.0)
        rows.append({"mode": mode, "top_k": targets.top_k if mode == "cached" else 0, "steps": steps,
                     "train_tokens": steps * args.batch * cfg.seq_len, "cache_s": cache_s if mode == "cached" else 0.0,
                     "cache_mb": targets.nbytes() / 2**20 if mode == "cached" else 0.0, "train_s": train_s,
                     "train_tokens_per_s": r.manifest["train_tokens_per_s"],
                     "kl_captured": coarse / exact if mode == "cached" else 1.0,
                     "val_kl_before": r.initial["kl"], "val_kl_after": r.final["kl"],
                     "children": args.children, "children_s": total})
    df = pd.DataFrame(rows)
    from puzzle.io import atomic_write_text

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / ("gkd_cache_quick.csv" if args.quick else "gkd_cache.csv")
    atomic_write_text(out, df.to_csv(index=False))
    print(df.round(4).to_string(index=False))
    live, cached = df.iloc[0], df.iloc[1]
    print(f"train tokens/s: live {live.train_tokens_per_s:.0f}, cached {cached.train_tokens_per_s:.0f} "
          f"({cached.train_tokens_per_s / live.train_tokens_per_s:.2f}x); {args.children} children: "
          f"{live.children_s:.0f} s -> {cached.children_s:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
