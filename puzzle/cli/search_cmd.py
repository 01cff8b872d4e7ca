"""``puzzle search``: the whole pipeline into one run directory, resumable stage by stage.

    puzzle search --budget 8xH100                                   # SmolLM2-135M, stdlib, quick preset
    puzzle search --budget 8xH100 --speedup 2.0 --out runs/search   # a new budget: only MIP onward reruns
    puzzle search --config runs/search.yaml                         # YAML keys mirror these flags
    puzzle search --constraint "layer[0] == parent" --constraint "count(attention != no_op) >= 20"
"""

from __future__ import annotations

import argparse

from puzzle.engines.rules import ENGINE_NAMES
from puzzle.search.config import BASELINES, SearchConfig

BASELINE_NAMES = BASELINES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="run the whole search: library, BLD, scoring, profile, MIP, fusion, GKD, "
                       "export, evaluation", description="Turn a parent into a faster child under a hardware "
                       "budget. The settings are resolved once into a plan (printed first, written to OUT/plan.json; "
                       "`puzzle plan` shows it without running) and checked before anything is written. Every stage "
                       "writes OUT/<stage>/ with a manifest; rerunning skips stages whose inputs and files did not "
                       "change and resumes an interrupted one; a new budget re-solves without retraining. "
                       "Ends with OUT/export/model (DeciLM checkpoint) and OUT/report.csv / report.png.")
    add_search_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def add_search_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``puzzle search`` (``puzzle plan`` takes the same ones)."""
    p.add_argument("--config", help="YAML file whose keys mirror these flags (flags given here override it)")
    p.add_argument("--out", default="runs/search", help="run directory (default: runs/search)")
    p.add_argument("--model", help="parent: embedded name or model directory (default: smollm2-135m)")
    p.add_argument("--data", nargs="+", help="corpus sources: stdlib, text files, directories, .jsonl, .parquet "
                   "(default: stdlib)")
    p.add_argument("--budget", help="deployment hardware COUNTxGPU, one node: 8xH100, 1xH200, 4xB200; or cpu, this "
                   "machine (default: 8xH100)")
    p.add_argument("--cluster", help="the machines that run the search, one rank per device: 8xH100 (one node), "
                   "64xH100, 2xcpu (ranks on this machine); not the deployment --budget (default: torchrun's world "
                   "size on this machine's device)")
    p.add_argument("--max-memory-per-rank", help="memory a rank may fill, e.g. 6GiB, 72GB (default: the device's "
                   "memory less 10%%; on the CPU the RAM less 10%%, split between the ranks); BLD trains in rounds "
                   "that fit it")
    p.add_argument("--tp", type=int, help="tensor-parallel degree on the target (default: the smallest one serving "
                   "engines accept for the parent that fits; the other GPUs serve replicas)")
    p.add_argument("--dtype", choices=("bf16", "fp8", "fp32"), help="serving dtype on the target "
                   "(default: bf16 on GPUs, fp32 on cpu)")
    p.add_argument("--speedup", type=float, help="minimum predicted speedup over the parent in the scenario "
                   "(default 1.5 when no other budget is given)")
    p.add_argument("--throughput", type=float, help="minimum predicted tokens/s of the whole target (all replicas) "
                   "in the scenario")
    p.add_argument("--memory", type=float, help="maximum GiB per device for weights + KV cache")
    p.add_argument("--scenario", choices=("decode", "prefill"), help="serving phase of the budget (default: decode)")
    p.add_argument("--batch", type=int, help="sequences per step (default: 8)")
    p.add_argument("--context", type=int, help="tokens per sequence: KV cache or prompt (default: 1024)")
    p.add_argument("--solver", choices=("ortools-mip", "pulp", "cpsat"), help="MIP backend (default: ortools-mip)")
    p.add_argument("--constraint", action="append", dest="constraints", metavar="TEXT",
                   help="custom MIP constraint, repeatable (replaces the config file's list), e.g. "
                   "'count(attention != no_op) >= 8', 'layer[0] == parent', 'total(params) <= 100e6' "
                   "(grammar in solvers/parse.py)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="time this machine's blocks and fit the roofline before costing (default: on for "
                   "--budget cpu, off for GPU budgets)")
    p.add_argument("--baselines", nargs="+", choices=BASELINE_NAMES, metavar="NAME",
                   help=f"also build these baselines at the same budget, with the same GKD: "
                   f"{', '.join(BASELINE_NAMES)} (default: none)")
    p.add_argument("--engine", choices=ENGINE_NAMES, help="serving engine the child must load in; the search space, "
                   "fusion and export keep to what it loads (puzzle/engines/rules.py) (default: vllm)")
    p.add_argument("--space", type=_space_file, metavar="YAML", help="search space: a YAML file holding a library "
                   "config's space: section, e.g. {ffn: {sizes: [0.5, 0.25]}, attention: {kv_heads: [2]}} (default: "
                   "fewer KV heads, linear and no-op attention; FFN widths 7/8..1/8, linear and no-op FFNs; less what "
                   "--engine cannot load)")
    p.add_argument("--preset", choices=("quick", "full"), help="stage sizes: quick (minutes on a laptop CPU) or full "
                   "(default: quick)")
    p.add_argument("--bld-tokens", type=int, help="BLD tokens (preset)")
    p.add_argument("--bld-eval-sequences", type=int, help="sequences of 256 tokens that calibrate the variants' "
                   "initialization and validate them in BLD, each (preset)")
    p.add_argument("--ffn-refit", action=argparse.BooleanOptionalAction, default=None, dest="ffn_refit",
                   help="refit each pruned FFN's down projection by least squares on the calibration tokens "
                   "(the library's initialization; default: off)")
    p.add_argument("--child-refit", action=argparse.BooleanOptionalAction, default=None, dest="child_refit",
                   help="child-aware BLD first refits the child's pruned FFNs by least squares on the child's own "
                   "stream (preset: full on, quick off)")
    p.add_argument("--score-sequences", type=int, help="held-out sequences for scoring (preset)")
    p.add_argument("--score-seq-len", type=int, help="tokens per scoring sequence (preset)")
    p.add_argument("--finalists", type=int, help="the MIP's best different solutions measured on held-out tokens; "
                   "the lowest KL goes on (1: the MIP's optimum; preset; 1 on a --cluster of several ranks)")
    p.add_argument("--refine-rounds", type=int, help="after the finalists, rounds of re-scoring the finalists' blocks "
                   "around the best measured child and solving again (0: off; preset; 0 on a --cluster of several ranks)")
    p.add_argument("--child-bld-tokens", type=int, help="tokens of child-aware BLD: the child's replaced sub-blocks "
                   "retrained on its own activations after the MIP; 0 skips it (preset; 0 on a --cluster of several ranks)")
    p.add_argument("--fuse-threshold", type=float, help="max pairwise FFN dependency of a fused segment; 0: no fusion "
                   "(default: 0.2 on GPUs, 0 on cpu, where a wide fused SwiGLU is slower)")
    p.add_argument("--fuse-sequences", type=int, help="calibration and held-out sequences of fusion (preset)")
    p.add_argument("--fuse-distill-steps", type=int, help="local distillation steps of each fused block (default: 100)")
    p.add_argument("--gkd-steps", type=int, help="global distillation steps; 0 skips it (preset)")
    p.add_argument("--gkd-batch", type=int, help="sequences per GKD step (preset)")
    p.add_argument("--gkd-top-k", type=int, help="the parent's top-k log-probabilities on the GKD tokens, cached once "
                   "for the child and every baseline; 0: a live parent every step (default: 64; 0 on a --cluster of "
                   "several ranks)")
    p.add_argument("--eval-sequences", type=int, help="held-out sequences of the final evaluation (preset)")
    p.add_argument("--seed", type=int, help="seed of the training order of BLD, child-aware BLD and GKD (default: 0)")
    p.add_argument("--speed", action=argparse.BooleanOptionalAction, default=None, dest="measure_speed",
                   help="measure parent and child step time on this machine in the evaluation (default: on)")
    p.add_argument("--verify", action="store_true", help="re-hash every recorded file before skipping a stage "
                   "(file sizes are always checked)")
    p.add_argument("--force", action="store_true", help="allow --out to be a directory that holds other files")


FLAG_SETTINGS = ("model", "data", "budget", "cluster", "max_memory_per_rank", "tp", "dtype", "speedup", "throughput",
                 "memory", "scenario", "batch", "context", "solver", "constraints", "calibrate", "baselines", "engine", "space", "preset", "bld_tokens", "bld_eval_sequences", "ffn_refit",
                 "score_sequences", "score_seq_len", "finalists", "refine_rounds", "child_bld_tokens", "child_refit", "fuse_threshold", "fuse_sequences", "fuse_distill_steps",
                 "gkd_steps", "gkd_batch", "gkd_top_k", "eval_sequences", "measure_speed", "seed")
"""Flags that set the :class:`SearchConfig` field of the same name (``--speed/--no-speed``: ``measure_speed``)."""


def _space_file(path: str) -> dict:
    """The ``--space`` YAML file's mapping (``space:`` at the top, or the section itself)."""
    from puzzle.errors import ConfigError
    from puzzle.io import read_yaml_config

    data = read_yaml_config(path)
    if not isinstance(data, dict):
        raise ConfigError(f"--space {path}: expected a mapping such as {{ffn: {{sizes: [0.5]}}}}")
    return data


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """The YAML file's settings, then the flags' (the one merge rule: later sources override earlier ones)."""
    cfg = SearchConfig.from_file(args.config) if args.config else SearchConfig()
    return cfg.merge({k: getattr(args, k) for k in FLAG_SETTINGS}, source="flag")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from puzzle.cli.plan_cmd import print_plan
    from puzzle.search import planned_stages, resolve, search
    from puzzle.search.preflight import preflight

    import logging
    import os

    first = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for the run
    if not first:
        logging.getLogger().setLevel(logging.WARNING)
    plan = resolve(config_from_args(args))
    preflight(plan, args.out, force=args.force)  # nothing is printed as a plan that cannot run
    if first:
        print_plan(plan, planned_stages(plan, args.out, verify=args.verify), brief=True)
    run = search(plan, args.out, progress=not args.no_progress, echo=print, verify=args.verify, force=args.force)
    if not first:
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(run.report.set_index("model").T.to_string())
        if "baselines" in run.stages:
            cols = ["model", "feasible", "pred_decode_speedup", "meas_decode_speedup", "pred_prefill_speedup",
                    "meas_prefill_speedup", "kl_to_parent", "top1_agreement", "ppl"]
            table = pd.read_csv(run.stages["baselines"].outputs["table"])
            print(f"\nbaselines at the same budget, same GKD ({run.stages['baselines'].outputs['plot']}):")
            print(table[[c for c in cols if c in table]].to_string(index=False))
    print(f"child: {run.export_dir} (DeciLM; load with AutoModelForCausalLM.from_pretrained(dir, "
          f"trust_remote_code=True) or puzzle.loading.load_model)\nreport: {run.directory / 'report.png'}")
    return 0
