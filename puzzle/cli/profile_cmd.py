"""``puzzle profile``: the cost of every (layer, block variant) on a hardware target.

    puzzle profile smollm2-135m --target 8xH100 --dtype fp8 --out runs/costs
    puzzle profile runs/lib --target cpu --measure --out runs/costs-cpu    # time variants here, fit, reuse
    puzzle profile runs/lib --scenario decode:batch=64,context=4096 --scenario prefill:batch=1,prompt=2048 ...

Writes ``OUT/costs.csv`` (the MIP's costs table, format in :mod:`solvers.io`) and
``OUT/profile.json`` (target, peaks, efficiency factors used, scenarios, the parent's totals).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from puzzle.profiler.hardware import DEFAULT_TARGET

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile", help="latency and memory of every block variant on a hardware target",
        description="Predict (roofline model with calibrated efficiency factors) or measure the latency of every "
        "block variant in prefill and decode scenarios, with tensor parallelism over the GPUs of the target, "
        "plus parameters, weight bytes and KV-cache bytes per token. Writes the costs table the MIP reads.")
    p.add_argument("source", help="a block library (its variants) or a parent model (embedded name or directory; "
                   "then the default search space, or --space)")
    p.add_argument("--target", default=DEFAULT_TARGET, help="COUNTxGPU, one node of COUNT GPUs (the tensor-parallel "
                   "degree is --tp), e.g. 8xH100, 1xH200, 4xB200, 2xA100, 1xL40S; or cpu for this machine "
                   f"(default: {DEFAULT_TARGET})")
    p.add_argument("--dtype", choices=("bf16", "fp8", "fp32"), default=None,
                   help="weight / GEMM dtype (default: bf16 on GPUs, fp32 on cpu)")
    p.add_argument("--scenario", action="append", default=None, metavar="SPEC",
                   help="serving step, repeatable: PHASE[:batch=B,length=N], PHASE prefill or decode, length "
                   "also spelled prompt / context; optionally NAME=... to name the column "
                   "(default: prefill:batch=1,prompt=1024 and decode:batch=8,context=1024)")
    p.add_argument("--space", help="with a model source: YAML whose space section is the search space "
                   "(default: the library's default space)")
    p.add_argument("--runtime", choices=("lean", "hf-eager"), default="lean",
                   help="lean: static cache + CUDA graphs / compile (default); hf-eager: adds the host floor of "
                   "Hugging Face eager generate (only changes whole-model totals)")
    p.add_argument("--measure", action="store_true", help="time every distinct variant on the present device "
                   "(CUDA events on a GPU, wall clock on the CPU), fit the efficiency factors to the times, save "
                   "that calibration for later runs, and cost the table with it")
    p.add_argument("--calibration", help="calibration JSON to use (written by --measure); default: the saved "
                   "calibration of this device, else datasheet efficiencies")
    p.add_argument("--tp", type=int, help="tensor-parallel degree (default: the smallest one serving engines accept "
                   "for this model that fits a device; the target's other GPUs serve replicas)")
    p.add_argument("--out", required=True, help="output directory (costs.csv, profile.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from block_library.config import LibraryConfig
    from puzzle.io import atomic_write_json, atomic_write_text
    from puzzle.profiler.counts import ModelShape
    from puzzle.profiler.deployment import choose_tensor_parallel
    from puzzle.profiler.hardware import parse_target
    from puzzle.profiler.scenario import default_scenarios, parse_scenario
    from puzzle.profiler.table import cost_table, layer_candidates, model_totals

    target = parse_target(args.target, dtype=args.dtype)
    scenarios = [parse_scenario(s) for s in args.scenario] if args.scenario else default_scenarios()
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        from puzzle.errors import ConfigError

        raise ConfigError(f"scenario names must differ, got {names}; name them as NAME=PHASE:...")
    space = LibraryConfig.from_file(args.space).space if args.space else None
    config, candidates = layer_candidates(args.source, space=space)
    shape = ModelShape.from_config(config)
    sized = next((s for s in scenarios if s.phase == "decode"), scenarios[0])  # the KV cache the fit must hold
    target = choose_tensor_parallel(target, shape, config.blocks, batch=sized.batch, kv_tokens=sized.kv_tokens,
                                    tp=args.tp)
    scenarios = [dataclasses.replace(s, replicas=target.replicas) for s in scenarios]
    if args.calibration or args.measure:
        target = _calibrated(args, target, shape, candidates, scenarios)
    table = cost_table(shape, candidates, config.blocks, target=target, scenarios=scenarios)
    out = Path(args.out)
    atomic_write_text(out / "costs.csv", table.to_csv(index=False))
    parent = model_totals(table, config.blocks, scenarios)
    atomic_write_json(out / "profile.json", {
        "stage": "profile", "source": str(args.source), "target": target.name, "deployment": target.to_dict(),
        "accelerator": {"name": target.accelerator.name, "tflops": dict(target.accelerator.tflops),
                        "bandwidth_tbs": target.accelerator.bandwidth_tbs, "link_gbs": target.accelerator.link_gbs},
        "efficiency": target.accelerator.efficiency.to_dict(),
        "scenarios": [s.to_dict() for s in scenarios], "runtime": args.runtime, "parent": parent,
        "candidates": int((table.layer >= 0).sum()),
    })
    _print(table, target, scenarios, parent, config, args.runtime, out)
    return 0


def _calibrated(args, target, shape, candidates, scenarios):  # noqa: ANN001, ANN202
    from puzzle.profiler.calibrate import calibrate_target

    return calibrate_target(target, shape, candidates, scenarios, measure=args.measure,
                            calibration=args.calibration)


def _print(table, target, scenarios, parent, config, runtime, out: Path) -> None:  # noqa: ANN001
    from puzzle.profiler.roofline import HF_EAGER

    print(f"{target.name} ({target.count} device(s), tensor parallel {target.tp}, {target.replicas} replica(s)): "
          f"{len(table) - 1} (layer, variant) candidates over {config.num_hidden_layers} layers "
          f"-> {out / 'costs.csv'}")
    blocks = table[table.layer >= 0].drop_duplicates("variant").drop(columns=["layer", "is_parent"])
    shown = blocks.assign(params=blocks.params.map(lambda v: f"{v / 1e6:.2f}M"),
                          weight_bytes=blocks.weight_bytes.map(lambda v: f"{v / 2**20:.2f} MiB"),
                          kv_bytes_per_token=blocks.kv_bytes_per_token.map(lambda v: f"{v / 1024:.2f} KiB"))
    for sc in scenarios:
        shown[sc.column] = blocks[sc.column].map(lambda v: f"{v:.4f}")
    print(shown.to_string(index=False))
    fixed = table[table.layer == -1].iloc[0]
    print("fixed (embedding, final norm, LM head): " + ", ".join(f"{sc.column} {fixed[sc.column]:.4f}" for sc in scenarios))
    for sc in scenarios:
        ms = parent[sc.column]
        if runtime == "hf-eager":
            ms = max(ms, HF_EAGER.step_ms(sc, config.num_hidden_layers))
        print(f"parent, {sc.describe()}: {ms:.3f} ms/step, {sc.throughput(ms):,.0f} tokens/s (whole target)")
    print(f"parent memory per device: weights {parent['weight_bytes'] / 2**30:.3f} GiB, "
          f"KV cache {parent['kv_bytes_per_token'] / 1024:.1f} KiB per token of context")
