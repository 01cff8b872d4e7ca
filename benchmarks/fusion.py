"""FFN fusion on SmolLM2-135M: dependency, KL before/after fusion, predicted and measured latency.

    python benchmarks/fusion.py [--quick] [--drop K] [--threshold T] [--threads N]

1. Remove attention from the K consecutive layers where removing it costs the least KL to the
   parent (sum of replace-1-block KLs on held-out stdlib text): a hand-made stand-in for a MIP
   child, contiguous so that it has a run to fuse.
2. ``puzzle.fusion.fuse_and_report`` on that child: dependency matrices, segments chosen by
   ``--threshold`` (mean pairwise dependency), KL of the fused model to the unfused one and to
   the parent, latency predicted on 8xH100 bf16 and on this CPU, and measured on this CPU.
3. Which run-level score predicts the damage: for every sub-segment of 2..4 layers, its mean and
   max pairwise dependency and parallel error against the KL of fusing it alone (Spearman).

Writes ``benchmarks/results/fusion.csv`` (the fusion report), ``fusion_latency.csv`` and
``fusion_segments.csv`` (the score study).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from puzzle.data.packing import load_sequences
from puzzle.fusion import FusionConfig, fuse_and_report, fuse_model
from puzzle.fusion.dependency import parallel_error, run_inputs
from puzzle.fusion.derive import derive_model, without_attention
from puzzle.fusion.evaluate import kl_to_reference, reference_logprobs
from puzzle.fusion.runs import Segment, segment_score
from puzzle.loading import load_model, load_tokenizer

RESULTS = Path(__file__).parent / "results"


def attention_removal_kl(parent, ids, reference) -> list[float]:  # noqa: ANN001
    """KL to the parent of removing attention from each layer alone."""
    out = []
    for layer in range(parent.config.num_hidden_layers):
        child = derive_model(parent, without_attention(parent.config.blocks, [layer]))
        out.append(kl_to_reference(child, ids, reference)["kl"])
    return out


def score_study(child, result, ids, calib, reference, max_len: int) -> pd.DataFrame:  # noqa: ANN001
    rows = []
    for dep in result.dependencies:
        x = run_inputs(child, calib, list(dep.run.layers))
        for length in range(2, max_len + 1):
            for lo in range(len(dep.run) - length + 1):
                seg = Segment(dep.run.start + lo, dep.run.start + lo + length)
                pairs = [dep.matrix[i][j] for i in range(lo, lo + length) for j in range(i + 1, lo + length)]
                rows.append({"segment": seg.label, "layers": length, "mean_dependency": segment_score(dep.matrix, lo, lo + length),
                             "max_dependency": max(pairs), "parallel_error": parallel_error(child, seg, x[seg.start]),
                             "kl": kl_to_reference(fuse_model(child, [seg]), ids, reference)["kl"]})
    return pd.DataFrame(rows)


def result_reference(child, ids) -> list[torch.Tensor]:  # noqa: ANN001
    """The unfused child's log-probs: the study's KL is fused vs unfused, as in the report."""
    return reference_logprobs(child, ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (under a minute)")
    ap.add_argument("--drop", type=int, default=None, help="attention layers to remove (default 10; quick 6)")
    ap.add_argument("--threshold", type=float, default=0.1, help="fusion threshold (default 0.1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's count)")
    ap.add_argument("--sequences", type=int, default=None, help="calibration / held-out sequences (default 8; quick 2)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    drop = args.drop or (6 if quick else 10)
    n_seq, seq_len = args.sequences or (2 if quick else 8), 128 if quick else 256
    t0 = time.perf_counter()
    parent, tok = load_model("smollm2-135m"), load_tokenizer("smollm2-135m")
    heldout = load_sequences(["stdlib"], tok, seq_len=seq_len, num_sequences=n_seq, split="validation")
    calib = load_sequences(["stdlib"], tok, seq_len=seq_len, num_sequences=n_seq)
    ref = reference_logprobs(parent, heldout)
    kls = attention_removal_kl(parent, heldout, ref)
    # A contiguous window, so that the child has a run to fuse: the K consecutive layers whose
    # attention removals cost the least KL in sum (a MIP with fusion candidates favours runs the same way).
    start = min(range(len(kls) - drop + 1), key=lambda s: sum(kls[s:s + drop]))
    layers = list(range(start, start + drop))
    child = derive_model(parent, without_attention(parent.config.blocks, layers))
    print("replace-1 KL of removing attention, per layer: " + " ".join(f"{k:.3f}" for k in kls))
    print(f"attention removed from layers {start}-{start + drop - 1} (sum of replace-1 KL {sum(kls[start:start + drop]):.3f})")

    cfg = FusionConfig(threshold=args.threshold, seq_len=seq_len, calib_sequences=n_seq, eval_sequences=n_seq,
                       targets=("8xH100", "cpu"), repeats=3 if quick else 10)
    result = fuse_and_report(child, tok, cfg, parent=parent, progress=False)
    for d in result.dependencies:
        print(f"run {d.run.label}: adjacent-pair dependency " + " ".join(f"{d.matrix[i][i + 1]:.3f}" for i in range(len(d.run) - 1)))
    report, latency = result.report, result.latency
    study = score_study(child, result, heldout, calib, result_reference(child, heldout), 2 if quick else 4)
    with pd.option_context("display.width", 220, "display.max_columns", 40, "display.float_format", "{:.4g}".format):
        print(report.to_string(index=False))
        print(latency.to_string(index=False))
        if len(study) > 2:
            corr = study[["mean_dependency", "max_dependency", "parallel_error", "kl"]].corr(method="spearman")["kl"]
            print(f"\nscore study ({len(study)} sub-segments of 2..{study.layers.max()} layers): Spearman rank "
                  f"correlation with the KL of fusing it alone:\n{corr.drop('kl').to_string()}")
            print(study.sort_values("kl").head(8).to_string(index=False))
    RESULTS.mkdir(exist_ok=True)
    report.assign(dropped_attention=" ".join(map(str, layers))).to_csv(RESULTS / "fusion.csv", index=False)
    latency.to_csv(RESULTS / "fusion_latency.csv", index=False)
    study.to_csv(RESULTS / "fusion_segments.csv", index=False)
    print(f"\nwrote {RESULTS / 'fusion.csv'} (+ _latency, _segments) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
