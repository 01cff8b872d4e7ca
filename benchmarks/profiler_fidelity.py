"""Hardware-profiler fidelity: the calibrated analytic model against measured block times.

    python benchmarks/profiler_fidelity.py [--quick] [--threads N] [--statistic median|min] [--save-calibration]

CPU part, on SmolLM2-135M's shape (hidden 576, 9 heads of 64, vocabulary 49152), fp32: every
sub-block variant of the default search space (attention gqa:3, gqa:1, linear with the FFN a
no-op; FFN swiglu 1536 ... 256 and linear with the attention a no-op) and three full blocks, in
a prefill (batch 1 x 256 tokens) and two decodes (batch 1 and 8, context 1024). Set A is timed,
the efficiency factors are fitted on A (:mod:`puzzle.profiler.fit`), then set B is timed with
independent repeats and compared with the calibrated prediction; ``uncal_*`` columns give the
prediction with the measured peaks alone (efficiencies 1.0) for context. The embedding + LM-head
step (``fixed``) is timed in B only: it checks the fit on ops it never saw.

H100 part: the analytic H100 model next to ``puzzle/profiler/data/h100_measured.csv``
(``puzzle.profiler.calibration_points``); those rows are in their own units (``unit`` column).

``--quick`` times gqa:3, linear, swiglu 1536 / 512, linear FFN and the parent block in the prefill
and the batch-1 decode, with fewer repeats: under a minute on an idle machine.
Prints a table and writes benchmarks/results/profiler_fidelity.csv.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "profiler_fidelity.csv"
SMOLLM2 = dict(hidden_size=576, num_attention_heads=9, head_dim=64, vocab_size=49152)


def _parent_shape():  # noqa: ANN202
    """SmolLM2-135M's config (the embedded parent) or, without it, its shape written out."""
    from puzzle.model import PuzzleConfig

    try:
        from puzzle.loading import load_config

        return load_config("smollm2-135m")
    except Exception as e:  # noqa: BLE001 - the package is optional; the shape is all we need
        print(f"(smollm2-135m not loadable: {e}; using its shape)")
        return PuzzleConfig(**SMOLLM2, num_key_value_heads=3, intermediate_size=1536, num_hidden_layers=30,
                            tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e5})


def _variants(config, quick: bool):  # noqa: ANN001, ANN202
    from block_library.space import SearchSpace
    from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

    layer = SearchSpace().layer_variants(config.blocks, num_attention_heads=config.num_attention_heads)[0]
    atts = [a for a in layer.attention if a.kind != "no_op"]
    ffns = [f for f in layer.ffn if f.kind != "no_op"]
    full = [(atts[0], ffns[0]), (AttentionConfig.gqa(1), FFNConfig.swiglu(768)),
            (AttentionConfig.linear(), FFNConfig.linear())]
    if quick:
        atts = [a for a in atts if a.kind != "gqa" or a == atts[0]]
        ffns = [f for f in ffns if f.kind != "swiglu" or f.intermediate_size in (1536, 512)]
        full = full[:1]
    blocks = [BlockConfig(attention=a, ffn=FFNConfig.no_op()) for a in atts]
    blocks += [BlockConfig(attention=AttentionConfig.no_op(), ffn=f) for f in ffns]
    return blocks + [BlockConfig(attention=a, ffn=f) for a, f in full]


def _scenarios(quick: bool):  # noqa: ANN202
    from puzzle.profiler.scenario import parse_scenario

    specs = ["prefill=prefill:batch=1,prompt=256", "decode_b1=decode:batch=1,context=1024",
             "decode_b8=decode:batch=8,context=1024"]
    return [parse_scenario(s) for s in (specs[:2] if quick else specs)]


def cpu_rows(quick: bool, statistic: str) -> tuple[list[dict], dict]:
    from puzzle.profiler.cpu import cpu_accelerator, cpu_peaks, default_cpu_efficiency, fingerprint
    from puzzle.profiler.fit import fit_efficiency
    from puzzle.profiler.hardware import Target
    from puzzle.profiler.measure import fixed_measurement, measure_blocks
    from puzzle.profiler.roofline import ops_ms

    config = _parent_shape()
    peaks = cpu_peaks()
    base = Target(accelerator=cpu_accelerator(), dtype="fp32").with_efficiency(default_cpu_efficiency(peaks))
    pairs = [(b, sc) for sc in _scenarios(quick) for b in _variants(config, quick)]
    kw = dict(repeats=4 if quick else 15, warmup=1 if quick else 2, stream_bytes=(48 if quick else 256) * 2**20,
              statistic=statistic)
    set_a = measure_blocks(config, pairs, desc="set A", **kw)
    efficiency = fit_efficiency(set_a, base)
    fitted = base.with_efficiency(efficiency)
    set_b = measure_blocks(config, pairs, desc="set B", seed=1, **kw)
    rows = [{"target": "cpu:fp32", "scenario": r.scenario.name, "variant": r.label,
             "predicted_ms": ops_ms(r.ops, fitted), "measured_ms": r.measured_ms,
             "uncal_predicted_ms": ops_ms(r.ops, base), "set_a_ms": a.measured_ms, "unit": "ms"}
            for r, a in zip(set_b, set_a)]
    for sc in _scenarios(quick):
        ms, ops = fixed_measurement(config, sc, repeats=kw["repeats"], warmup=kw["warmup"], statistic=statistic)
        rows.append({"target": "cpu:fp32", "scenario": sc.name, "variant": "fixed (not fitted)",
                     "predicted_ms": ops_ms(ops, fitted), "measured_ms": ms, "uncal_predicted_ms": ops_ms(ops, base),
                     "set_a_ms": float("nan"), "unit": "ms"})
    info = {"efficiency": efficiency, "peaks": peaks, "fingerprint": fingerprint(), "target": fitted,
            "set_a": set_a}
    return rows, info


def h100_rows() -> list[dict]:
    from puzzle.profiler.calibration_points import h100_rows as points

    return [{"target": "1xH100 (shipped measurements)", "scenario": p["kind"], "variant": f"{p['dtype']} {p['shape']}",
             "predicted_ms": p["predicted"], "measured_ms": p["measured"], "unit": p["unit"]} for p in points()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer variants and repeats, one decode (under a minute)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current count)")
    ap.add_argument("--statistic", choices=("median", "min"), default="min",
                    help="summary of the repeats: fastest (default: other jobs only ever slow a run down) or median")
    ap.add_argument("--save-calibration", action="store_true",
                    help="save the fit as this machine's calibration (later `--target cpu` runs use it)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    cpu, info = cpu_rows(args.quick, args.statistic)
    df = pd.DataFrame(cpu + h100_rows())
    df["rel_err"] = df.predicted_ms / df.measured_ms - 1
    df["uncal_rel_err"] = df.uncal_predicted_ms / df.measured_ms - 1
    df["a_vs_b"] = df.set_a_ms / df.measured_ms - 1  # run-to-run noise of the measurement itself
    wall = time.perf_counter() - t0

    shown = df.copy()
    for c in ("predicted_ms", "measured_ms", "uncal_predicted_ms", "set_a_ms"):
        shown[c] = shown[c].map(lambda v: f"{v:.4g}")
    for c in ("rel_err", "uncal_rel_err", "a_vs_b"):
        shown[c] = shown[c].map(lambda v: "" if pd.isna(v) else f"{v:+.1%}")
    print(shown.to_string(index=False))
    eff, peaks = info["efficiency"], info["peaks"]
    print(f"\ncpu {info['fingerprint']} ({torch.get_num_threads()} threads): peaks {peaks['fp32_flops'] / 1e9:.1f} "
          f"GFLOP/s fp32, {peaks['bandwidth'] / 1e9:.1f} GB/s; fitted compute {eff.compute['fp32']:.3f}, "
          f"memory {eff.memory:.3f}, overlap {eff.overlap:.2f}, kernel overhead {eff.kernel_overhead_us:.2f} us; "
          f"{args.statistic} of repeats")
    for target, g in df.groupby("target", sort=False):
        err = g.rel_err.abs()
        line = f"{target}: max |rel_err| {err.max():.1%}, median {err.median():.1%} over {len(g)} rows"
        if g.uncal_rel_err.notna().any():
            line += f" (uncalibrated: max {g.uncal_rel_err.abs().max():.1%}, median {g.uncal_rel_err.abs().median():.1%};"
            line += f" set A vs B noise: median {g.a_vs_b.abs().median():.1%})"
        print(line)
    print(f"wall time {wall:.0f} s")
    if args.save_calibration:
        from puzzle.profiler.fit import default_calibration_path, save_calibration

        acc = info["target"].accelerator
        path = save_calibration(default_calibration_path(info["fingerprint"]), "cpu:fp32", info["fingerprint"], eff,
                                info["set_a"], peaks={"tflops": dict(acc.tflops), "bandwidth_tbs": acc.bandwidth_tbs})
        print(f"saved calibration {path}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(RESULTS, index=False)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
