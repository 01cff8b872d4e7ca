"""FFN fusion on SmolLM2-135M: dependency, KL before/after fusion, predicted and measured latency.

    python benchmarks/fusion.py [--quick] [--drop K] [--threshold T] [--threads N]

1. Remove attention from the K consecutive layers where removing it costs the least KL to the
   parent (sum of replace-1-block KLs on held-out stdlib text): a hand-made stand-in for a MIP
   child, contiguous so that it has a run to fuse.
2. ``puzzle.fusion.fuse_and_report`` on that child for a sweep of thresholds on the segment
   score (max pairwise dependency; the paper's mean once), the last also with a short local
   distillation of the fused blocks: KL of the fused model to the unfused one and to
   the parent, latency predicted on 8xH100 bf16 and on this CPU, and measured on this CPU.
3. Which run-level score predicts the damage: for every sub-segment of 2..4 layers, its mean and
   max pairwise dependency and parallel error against the KL of fusing it alone (Spearman).

Writes ``benchmarks/results/fusion.csv`` (one row per threshold: segments, KL before/after,
predicted and measured speedups) and ``fusion_segments.csv`` (the score study).
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
from puzzle.profiler.scenario import parse_scenario

RESULTS = Path(__file__).parent / "results"
QUICK_SCENARIOS = ("prefill:batch=1,prompt=256", "decode:batch=8,context=256")


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
    ap.add_argument("--threshold", type=float, default=None, help="one fusion threshold (default: a sweep)")
    ap.add_argument("--distill-steps", type=int, default=100, help="distillation steps of the last setting (default 100)")
    ap.add_argument("--distill-lr", type=float, default=1e-4, help="distillation learning rate (default 1e-4)")
    ap.add_argument("--score", choices=("max", "mean"), default="max", help="segment score with --threshold (default max)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's count)")
    ap.add_argument("--sequences", type=int, default=None, help="calibration / held-out sequences (default 8; quick 2)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    drop = args.drop or (6 if quick else 10)
    n_seq, seq_len = args.sequences or (1 if quick else 8), 128 if quick else 256
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

    rows, study = [], pd.DataFrame()
    if args.threshold is not None:
        settings = [(args.score, args.threshold, 0)]
    elif quick:
        settings = [("max", 0.2, 0)]
    else:  # max-score sweep, the paper's mean score at the largest threshold, and distillation on top
        settings = [("max", 0.12, 0), ("max", 0.16, 0), ("max", 0.2, 0), ("mean", 0.2, 0),
                    ("max", 0.2, args.distill_steps)]
    for score, threshold, steps in settings:
        cfg = FusionConfig(threshold=threshold, max_segment_kl=None, seq_len=seq_len, calib_sequences=n_seq, eval_sequences=n_seq,
                           targets=("8xH100", "cpu"), repeats=3 if quick else 10, distill_steps=steps,
                           distill_lr=args.distill_lr, score=score,
                           scenarios=tuple(parse_scenario(x) for x in QUICK_SCENARIOS) if quick else FusionConfig().scenarios)
        result = fuse_and_report(child, tok, cfg, parent=parent, progress=False)
        rep = result.report.set_index("segment")
        final = rep.loc["all (distilled)" if steps else "all"]
        lat = {(r.target.split(":")[0], r.scenario, r.source): r.speedup for r in result.latency.itertuples()}
        rows.append({"score": score, "threshold": threshold, "distill_steps": steps,
                     "segments": " ".join(s.label for s in result.segments) or "-",
                     "layers_before": child.config.num_hidden_layers, "layers_after": result.model.config.num_hidden_layers,
                     "kl_unfused_to_parent": rep.loc["unfused", "kl_to_parent"],
                     "kl_fused_to_parent": final["kl_to_parent"], "kl_fused_to_unfused": final["kl"],
                     "top1_fused_vs_unfused": final["top1_agreement"],
                     "pred_8xH100_bf16_prefill_speedup": lat[("8xH100", "prefill", "predicted")],
                     "pred_8xH100_bf16_decode_speedup": lat[("8xH100", "decode", "predicted")],
                     "pred_cpu_prefill_speedup": lat[("cpu", "prefill", "predicted")],
                     "pred_cpu_decode_speedup": lat[("cpu", "decode", "predicted")],
                     "meas_cpu_prefill_speedup": lat[("this cpu", "prefill", "measured")],
                     "meas_cpu_decode_speedup": lat[("this cpu", "decode", "measured")]})
        print(f"{score} <= {threshold}, distill {steps}: {rows[-1]['segments']}", flush=True)
        if len(rows) == 1:
            for d in result.dependencies:
                print(f"run {d.run.label}: adjacent-pair dependency "
                      + " ".join(f"{d.matrix[i][i + 1]:.3f}" for i in range(len(d.run) - 1)))
            study = score_study(child, result, heldout, calib, result_reference(child, heldout), 2 if quick else 4)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.float_format", "{:.4g}".format):
        print(table.T.to_string(header=False))
        if len(study) > 2:
            corr = study[["mean_dependency", "max_dependency", "parallel_error", "kl"]].corr(method="spearman")["kl"]
            print(f"\nscore study ({len(study)} sub-segments of 2..{study.layers.max()} layers): Spearman rank "
                  f"correlation with the KL of fusing it alone:\n{corr.drop('kl').to_string()}")
            print(study.sort_values("kl").head(8).to_string(index=False))
    RESULTS.mkdir(exist_ok=True)
    table.assign(dropped_attention=f"{layers[0]}-{layers[-1]}").to_csv(RESULTS / "fusion.csv", index=False)
    study.to_csv(RESULTS / "fusion_segments.csv", index=False)
    print(f"\nwrote {RESULTS / 'fusion.csv'} (+ fusion_segments.csv) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
