"""Does the search's choice of FFN widths still matter once the child-stream refit has run? Several allocations of
the same decoder FLOPs, each refit alike, judged on the same held-out tokens (issue 32, the fair controls).

    python benchmarks/allocations.py                    # SmolLM2 at 81% of its decoder FLOPs, 16,384 refit tokens
    python benchmarks/allocations.py --tokens 131072    # the full preset's refit tokens (about 40 min a row)
    python benchmarks/allocations.py --quick            # a tiny random parent, under a minute

The allocations, every one with the same total FFN width (the uniform one's):

* ``uniform``: every FFN at the keep ratio (0.75: 1,152 of SmolLM2's 1,536 channels);
* ``search``: the full preset's MIP child at that budget, read from ``benchmarks/results/quality.csv`` (the
  ``puzzle_search`` row of ``full+child-refit`` at 81.3%);
* ``search_reversed``: the same widths with the layers' order reversed (does the position matter?);
* ``ends_whole``: the first and last FFN whole, the rest uniform (the search's most visible trait);
* ``halfway``: each layer halfway between the search's width and the uniform one (rounded to 128 channels, 1/12
  of the parent's).

Each child is assembled from an untrained uniform library (:func:`benchmarks.quality.uniform_library`; the refit
selects the channels again from the parent's whole FFN anyway), refit as the search's child_bld stage does
(``ChildBLDConfig(refit=True)``: channels selected again on the child's stream, drift 0.75) on ``--tokens`` of the
training split, then measured against the parent on quality.py's 8 x 256 held-out tokens. Prints the table and
writes ``benchmarks/results/allocations.csv`` (``allocations_quick.csv`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's root: benchmarks.quality

from benchmarks.quality import RESULTS, held_out, search_config, uniform_library  # noqa: E402

KEEP = 0.75
"""The uniform pruning's keep ratio: 81.3% of SmolLM2's decoder FLOPs."""


def search_widths(quality_csv: Path, layers: int) -> list[int]:
    """The full preset's MIP child at 81.3% (``puzzle_search``, ``full+child-refit``): its FFN widths by layer."""
    df = pd.read_csv(quality_csv)
    row = df[(df.method == "puzzle_search") & (df.preset == "full+child-refit") & (df.budget == "flops=0.813")
             & (df.ranks == 1)]
    if not len(row):
        raise SystemExit(f"{quality_csv} has no full+child-refit puzzle_search row at flops=0.813: run "
                         "`python benchmarks/quality.py --preset full --child-refit` first")
    blocks = str(row.iloc[0].detail).split(": ", 1)[1].split()
    widths = [int(b.split("swiglu:")[1]) for b in blocks]
    if len(widths) != layers:
        raise SystemExit(f"the search's child has {len(widths)} layers, the parent {layers}")
    return widths


def allocations(search: list[int], uniform: int, parent: int) -> dict[str, list[int]]:
    """Every allocation of the module's docstring, each summing to ``len(search) * uniform`` channels."""
    L = len(search)
    total = L * uniform
    inner = total - 2 * parent  # the layers between two whole ends share the rest, in steps of 1/12 of the parent's
    step = max(1, parent // 12)  # SmolLM2: 128 channels
    low = (inner // (L - 2)) // step * step
    n_high = (inner - low * (L - 2)) // step
    ends = [parent] + [low + step] * n_high + [low] * (L - 2 - n_high) + [parent]
    half = [int(round((w + uniform) / 2 / step)) * step for w in search]
    out = {"uniform": [uniform] * L, "search": search, "search_reversed": search[::-1], "ends_whole": ends,
           "halfway": half}
    bad = {k: sum(v) for k, v in out.items() if abs(sum(v) - total) > step}
    if bad:
        raise SystemExit(f"allocations off the uniform one's {total} channels: {bad}")
    return out


def quick_search(layers: int, parent: int, uniform: int) -> list[int]:
    """A stand-in for the search's child on the tiny parent: whole ends, the middle narrower (the same total)."""
    inner = layers * uniform - 2 * parent
    return [parent] + [inner // (layers - 2)] * (layers - 2) + [parent]


def run(tmp: Path, *, quick: bool, tokens: int, seed: int) -> pd.DataFrame:
    import torch

    from puzzle.distill.child_bld import ChildBLDConfig
    from puzzle.distill.child_refit import refit_child_ffns
    from puzzle.loading import load_model, load_tokenizer
    from puzzle.schema import FFNConfig
    from puzzle.search import resolve
    from puzzle.search.context import StageContext
    from puzzle.search.finalists import measure, parent_logprobs
    from puzzle.search.stages.child_bld import training_ids

    parent_dir = None
    if quick:
        from benchmarks.tiny_parent import write_tiny_parent

        parent_dir = str(write_tiny_parent(tmp / "parent", layers=4))
    torch.manual_seed(seed)
    plan = resolve(search_config(quick, "full", seed, parent_dir))
    ctx = StageContext(plan, tmp, False)
    parent, tok = load_model(plan.model), load_tokenizer(plan.model)
    _, eval_ids = held_out(ctx, tok, 2 if quick else 4, 2 if quick else 8)  # quality.py's evaluation tokens
    reference = parent_logprobs(parent, eval_ids)
    blocks0 = plan.parent_config.blocks
    D, L = blocks0[0].ffn.intermediate_size, len(blocks0)
    uniform = round(KEEP * D)
    search = quick_search(L, D, uniform) if quick else search_widths(RESULTS / "quality.csv", L)
    allocs = allocations(search, uniform, D)
    widths = sorted({w for ws in allocs.values() for w in ws if w < D})
    uni = uniform_library(ctx, tmp / "library", [w / D for w in widths])
    cfg = ChildBLDConfig(tokens=tokens, seed=seed, refit=True)  # 256 tokens a sequence, as quality.py's rows
    ids = training_ids(plan, tok, cfg)
    decoder = sum(p.numel() for layer in parent.model.layers for p in layer.parameters())
    rows = []
    for name, ws in allocs.items():
        model = uni.assemble([replace(b, ffn=FFNConfig.swiglu(w)) for b, w in zip(uni.parent_config.blocks, ws)],
                             initial=True)
        pct = 100.0 * sum(p.numel() for layer in model.model.layers for p in layer.parameters()) / decoder
        t0 = time.perf_counter()
        refit_child_ffns(model, parent, ids[:cfg.steps * cfg.step_batch], ridge=cfg.refit_ridge,
                         drift=cfg.refit_drift, batch=cfg.batch)
        q = measure(model, eval_ids, reference)
        rows.append({"allocation": name, "flops_pct": round(pct, 2), "refit_tokens": tokens, "kl": q["kl"],
                     "top1": q["top1_agreement"], "ppl": q["ppl"], "refit_s": round(time.perf_counter() - t0, 1),
                     "widths": " ".join(map(str, ws))})
        print({k: v for k, v in rows[-1].items() if k != "widths"}, flush=True)
        del model
    df = pd.DataFrame(rows)
    df["vs_uniform"] = df.kl / float(df.loc[df.allocation == "uniform", "kl"].iloc[0]) - 1
    return df


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny random parent, 1,024 refit tokens: under a minute")
    ap.add_argument("--tokens", type=int, default=None, help="refit tokens (default 16,384; 1,024 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", type=Path, help="CSV path (default: benchmarks/results/allocations[_quick].csv)")
    args = ap.parse_args(argv)
    tokens = args.tokens or (1024 if args.quick else 16384)
    if tokens < 256:
        ap.error(f"--tokens must be at least 256 (one sequence), got {tokens}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        df = run(Path(tmp), quick=args.quick, tokens=tokens, seed=args.seed)
    from puzzle.io import atomic_write_text

    path = args.csv or RESULTS / ("allocations_quick.csv" if args.quick else "allocations.csv")
    atomic_write_text(path, df.to_csv(index=False))
    print(df.drop(columns=["widths"]).round(4).to_string(index=False))
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
