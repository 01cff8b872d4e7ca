"""Quality where the child is served: the search at 256 tokens against the search at the budget's context (issue 32).

    python benchmarks/context.py                                # SmolLM2, quick preset, --budget 8xH100 (~35 min)
    python benchmarks/context.py --run 256=DIR --run 1024=DIR   # finished runs (e.g. the README command's --out)
    python benchmarks/context.py --quick                        # a tiny random parent at 64 and 128 tokens (< 1 min)

Runs ``puzzle search --budget 8xH100 --quality-context C`` for each context C (256, and 1024: the decode budget's KV
length, the default), with the same tokens at both: at 256 the scoring, GKD and evaluation read 4x the sequences
(``--score-sequences 4 --gkd-batch 4 --eval-sequences 8``; the finalists and child-aware BLD keep their tokens by
themselves). Each run builds its own library (BLD at 256 tokens). Each child is then judged by the same
evaluator, the project's (:func:`puzzle.evaluation.evaluate`, as ``puzzle evaluate --context``), on 16 held-out
sequences at 256 tokens and 16 at 1024.

Prints the table and writes ``benchmarks/results/context.csv`` (``context_quick.csv`` with ``--quick``): context,
attention_kept (of the parent's layers), ffn_kept (the child's FFN width over the parent's), speedup (predicted on
the budget), kl_256, top1_256, kl_1024, top1_1024, ppl_1024, kl_ratio (kl_1024 / kl_256), search_s (the stages'
seconds, its own library's included) and, for the stages that read the quality context, the run's measured peak RSS
over today's plan of it (``resources.csv`` against :func:`peak_ratios`; the rank furthest from its plan):
score_peak_ratio, child_bld_peak_ratio and gkd_peak_ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONTEXTS = (256, 1024)
JUDGED = {256: 16, 1024: 16}
"""Held-out sequences the children are judged on, by context (as ``puzzle evaluate --sequences 16 --context 256
--context 1024``)."""
MEMORY_STAGES = ("score", "child_bld", "gkd")
"""The stages whose memory grows with the quality context: their measured peak against the plan's, per run."""
SAME_TOKENS_AT_256 = ["--score-sequences", "4", "--gkd-batch", "4", "--eval-sequences", "8"]
"""At 256 tokens: the quick preset's scoring, GKD and evaluation tokens at 1024 (1, 1 and 2 sequences of 1024)."""


def search(out: Path, context: int, flags: list[str]) -> None:
    """``puzzle search FLAGS --quality-context CONTEXT --out OUT``."""
    cmd = [sys.executable, "-m", "puzzle.cli.main", "search", *flags, "--quality-context", str(context),
           "--out", str(out), "--no-progress"]
    print("$", " ".join(cmd[2:]), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"the search at {context} tokens failed (exit {done.returncode})")


def stage_seconds(run: Path) -> float:
    """The seconds every stage of ``run`` recorded (``stage.json``): the search's time, its own library's included."""
    return sum(float(json.loads(p.read_text()).get("seconds") or 0.0) for p in run.glob("*/stage.json"))


def peak_ratios(run: Path) -> dict[str, float]:
    """``{stage}_peak_ratio``: the peak RSS ``run`` measured (``resources.csv``) over today's plan of it for the child
    the run chose (``benchmarks/stage_times.py``'s :func:`replan`), for each of :data:`MEMORY_STAGES` (the rank
    furthest from its plan); NaN for a stage that did not run."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.stage_times import replan

    _, stages = replan(run)
    usage = pd.read_csv(run / "resources.csv")
    out = {}
    for stage in MEMORY_STAGES:
        d = usage[(usage.stage == stage) & ~usage.skipped.astype(bool)]
        planned = [stages[stage].ranks[int(r)].device_bytes / 2**30 for r in d["rank"]]
        ratio = d.measured_peak_gib.to_numpy() / planned
        out[f"{stage}_peak_ratio"] = float(ratio[abs(ratio - 1).argmax()]) if len(d) else float("nan")
    return out


def child_row(run: Path, judged: dict[int, int]) -> dict[str, Any]:
    """The exported child of ``run``: its shape against the parent's, its predicted speedup, and its quality by
    context judged against the parent on ``judged`` (``{context: sequences}``)."""
    from puzzle.evaluation import evaluate
    from puzzle.loading import load_model, load_tokenizer

    doc = json.loads((run / "run.json").read_text())
    config = doc["config"]
    parent = load_model(config.get("model", "smollm2-135m"))
    child = load_model(run / "export" / "model")
    tokenizer = load_tokenizer(config.get("model", "smollm2-135m"))
    blocks, parents = child.config.blocks, parent.config.blocks
    attention = sum(b.attention.kind != "no_op" for b in blocks)
    width = sum(b.ffn.intermediate_size or 0 for b in blocks if b.ffn.kind == "swiglu")
    ev = evaluate(child, tokenizer, parent=parent, sources=config.get("data") or ["stdlib"], seq_len=min(judged),
                  num_sequences=judged[min(judged)], contexts=judged)
    by = {int(c): q for c, q in ev.contexts.items()}
    lo, hi = min(judged), max(judged)
    speedup = json.loads((run / "solve" / "solution.json").read_text())["totals"].get("speedup")  # the MIP's child
    return {"attention_kept": f"{attention}/{len(parents)}",
            "ffn_kept": round(width / sum(b.ffn.intermediate_size for b in parents), 3),
            "speedup": speedup, f"kl_{lo}": by[lo]["kl"], f"top1_{lo}": by[lo]["top1_agreement"],
            f"kl_{hi}": by[hi]["kl"], f"top1_{hi}": by[hi]["top1_agreement"], f"ppl_{hi}": by[hi]["ppl"],
            "kl_ratio": by[hi]["kl"] / by[lo]["kl"]}


def quick_setup(tmp: Path) -> tuple[list[str], tuple[int, int], dict[int, int]]:
    """A 6-layer random parent (256 positions), stage sizes cut to seconds, contexts 64 and 128 (the same sizes in
    sequences at both)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.tiny_parent import write_tiny_parent

    parent = write_tiny_parent(tmp / "parent", layers=6)
    flags = ["--model", str(parent), "--budget", "8xH100", "--bld-tokens", "8192", "--score-sequences", "1",
             "--fuse-sequences", "1", "--fuse-distill-steps", "2", "--gkd-steps", "2", "--eval-sequences", "1",
             "--child-bld-tokens", "2048", "--no-speed", "--speedup", "1.2", "--engine", "transformers"]
    return flags, (64, 128), {64: 4, 128: 4}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], metavar="CONTEXT=DIR",
                    help="a finished search at CONTEXT tokens (its --out), repeatable; the others are run")
    ap.add_argument("--keep", type=Path, help="directory to keep the runs in (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="a tiny random parent at 64 and 128 tokens: under a minute")
    ap.add_argument("--csv", type=Path, help="CSV path (default: benchmarks/results/context[_quick].csv)")
    args = ap.parse_args(argv)
    given: dict[int, Path] = {}
    for item in args.run:
        context, sep, directory = item.partition("=")
        if not sep or not context.isdigit() or not (Path(directory) / "run.json").is_file():
            raise SystemExit(f"--run {item}: give CONTEXT=DIR, DIR a finished search's --out (with run.json)")
        given[int(context)] = Path(directory)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        flags, contexts, judged = (quick_setup(Path(tmp)) if args.quick
                                   else (["--budget", "8xH100"], CONTEXTS, JUDGED))
        home = args.keep or Path(tmp)
        for context in contexts:
            run = given.get(context) or home / f"context-{context}"
            if context not in given:
                search(run, context, flags + (SAME_TOKENS_AT_256 if context == 256 and not args.quick else []))
            rows.append({"context": context, **child_row(run, judged), "search_s": round(stage_seconds(run), 1),
                         **peak_ratios(run)})
    table = pd.DataFrame(rows)
    path = args.csv or RESULTS / ("context_quick.csv" if args.quick else "context.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
