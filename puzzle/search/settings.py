"""The settings of a search, declared once: name, type, default or preset values, help, reader, user or advanced.

Everything else is made from this table: :class:`puzzle.search.config.SearchConfig`'s keys and checks, the
YAML keys (advanced ones may sit under ``advanced:``), the flags of ``puzzle search`` / ``puzzle plan``
(user choices first, advanced knobs in their own group), the defaults and presets :func:`resolve` fills in,
and the typed sections stages read (:class:`puzzle.search.setting.Section`). A new setting is one row
here and one field in the section of the stage that reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from puzzle.engines.rules import ENGINE_NAMES
from puzzle.errors import ConfigError
from puzzle.profiler.hardware import DEFAULT_TARGET
from puzzle.search.setting import DERIVED, PLAN, PerParameter, Spec, Table

PRESET_NAMES = ("quick", "full", "production")
BASELINES = ("uniform_ffn", "shortgpt", "attention_removal")
"""Baseline rules of the ``baselines`` stage (see :mod:`puzzle.search.baselines`)."""
DEFAULT_SPEEDUP = 1.5
"""The speedup asked for when no budget (speedup, throughput, memory) is given."""


def _data(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ConfigError("data must name at least one source (stdlib, a file or a directory)")
    return value


def _constraints(value: tuple[str, ...]) -> tuple[str, ...]:
    from solvers.errors import ConstraintSyntaxError
    from solvers.parse import parse_constraint

    for text in value:
        try:
            parse_constraint(text)
        except ConstraintSyntaxError as e:
            raise ConfigError(str(e)) from e
    return value


def _space(value: Mapping[str, Any]) -> dict[str, Any]:
    from block_library.space import SearchSpace

    data = dict(value.get("space", value)) if set(value) == {"space"} else dict(value)
    if "engine" in data:
        raise ConfigError("space: set the serving engine with the engine setting (--engine), not inside space")
    SearchSpace.from_dict(data)  # unknown keys and bad variants: one line naming them
    return data


def _sizes(quick: Any, full: Any, production: Any) -> dict[str, Any]:
    return {"quick": quick, "full": full, "production": production}


BLD_PER_BILLION = PerParameter(1e9 / 70, least=65536, unit=256,
                               source="the Puzzle paper's block library: about 1B BLD tokens for a 70B parent")
"""The production preset's library BLD tokens: 14.3 M per billion parent parameters (8B: 114 M; 70B: 1.0 B)."""
CHILD_BLD_PER_BILLION = PerParameter(1e9 / 70 / 4, least=131072, unit=256,
                                     source="a quarter of BLD's: it trains the few dozen sub-blocks the MIP chose, "
                                            "not every variant of every layer")
GKD_BATCH = 16
"""The production preset's sequences per GKD step (16,384 tokens at the default quality context of 1024: 2 per rank
on 8 GPUs)."""
GKD_PER_BILLION = PerParameter(45e9 / 70 / (GKD_BATCH * 1024), least=200,
                               source="the Puzzle paper: Nemotron-51B was distilled from its 70B parent on at most 45B "
                                      "tokens (0.64 per parent parameter), in steps of 16,384 tokens")
"""The production preset's GKD steps: 8B: 314 k steps (5.1 B tokens); 70B: 2.75 M steps (45 B tokens)."""


_BUDGET = "Speedup, throughput and memory are costed on --budget, in --scenario, with --batch and --context."
SETTINGS = Table([
    # ---- the parent, the data, the hardware: what a user says
    Spec(name="model", kind="str", stages=(PLAN,), default="smollm2-135m",
         help="The parent: an embedded name (smollm2-135m), a model directory with safetensors weights, a hub id "
              "(org/name[@revision], read through huggingface_hub's cache: HF_TOKEN and HF_HUB_OFFLINE=1 work), or a "
              "shape name for planning only (llama-3.1-70b)."),
    Spec(name="data", kind="strs", stages=("library", "bld", "score", "solve", "child_bld", "fuse", "gkd",
                                           "evaluate", "baselines"), default=("stdlib",), validate=_data, metavar="SOURCE",
         help="Corpus of every stage: stdlib (the Python standard library's source), text files, directories, "
              ".jsonl, .parquet."),
    Spec(name="budget", kind="str", stages=(PLAN,), default=DEFAULT_TARGET,
         help="The deployment hardware: COUNTxGPU, one node (8xH100, 1xH200, 4xB200), or cpu (this machine)."),
    Spec(name="cluster", kind="str", stages=(PLAN,), default=DERIVED,
         default_text="torchrun's world size on this machine's device",
         help="The machines that run the search, one rank per device: 8xH100 (one node), 64xH100, 2xcpu; "
              "not the deployment --budget. `puzzle search` refuses one this machine does not have (its GPUs, "
              "its cores); `puzzle plan` sizes any."),
    Spec(name="max_memory_per_rank", kind="size", stages=(PLAN,), default=DERIVED,
         default_text="the device's memory less 10%; on the CPU the RAM less 10%, split between the ranks",
         help="Memory a rank may fill, e.g. 6GiB or 72GB; BLD trains its variants in rounds that fit it."),
    Spec(name="tp", kind="int", stages=(PLAN,), default=DERIVED, advanced=True,
         default_text="the smallest degree serving engines accept that fits; the other GPUs serve replicas",
         help="Tensor-parallel degree on the deployment target."),
    Spec(name="dtype", kind="str", stages=(PLAN,), default=DERIVED, choices=("bf16", "fp8", "fp32"),
         default_text="bf16 on GPUs, fp32 on cpu", help="Serving dtype on the deployment target."),
    # ---- the budget
    Spec(name="speedup", kind="float", stages=(PLAN,), default_text=f"{DEFAULT_SPEEDUP} when no other budget is given",
         help="Minimum predicted step-time speedup over the parent. " + _BUDGET),
    Spec(name="throughput", kind="float", stages=(PLAN,),
         help="Minimum predicted tokens/s of the whole target (all replicas)."),
    Spec(name="memory", kind="float", stages=(PLAN,), help="Maximum GiB per device for weights and KV cache."),
    Spec(name="scenario", kind="str", stages=(PLAN,), default="decode", choices=("decode", "prefill"),
         help="The serving phase the budget is about."),
    Spec(name="batch", kind="int", stages=(PLAN,), default=8, help="Sequences per step of one replica."),
    Spec(name="context", kind="int", stages=(PLAN,), default=1024,
         help="Tokens per sequence: the KV cache in decode, the prompt in prefill."),
    Spec(name="solver", kind="str", stages=("solve",), default="ortools-mip", advanced=True,
         choices=("ortools-mip", "pulp", "cpsat"), help="The MIP backend: OR-tools' MIP solver, PuLP's CBC or CP-SAT."),
    Spec(name="constraints", kind="strs", stages=("solve",), default=(), flag="--constraint", repeat=True,
         metavar="TEXT", validate=_constraints,
         help="A custom MIP constraint, repeatable (replaces a config file's list), e.g. "
              "'count(attention != no_op) >= 8', 'layer[0] == parent', 'total(params) <= 100e6' "
              "(grammar: solvers/parse.py)."),
    Spec(name="calibrate", kind="bool", stages=("profile", "evaluate", "baselines"), default=DERIVED, advanced=True,
         default_text="on for --budget cpu, off for GPU budgets",
         help="Time this machine's blocks and fit the roofline before costing."),
    Spec(name="baselines", kind="strs", stages=("baselines",), default=(), choices=BASELINES, metavar="NAME",
         help=f"Also build these baselines at the same budget, with the same child-aware BLD, GKD and evaluation: "
              f"{', '.join(BASELINES)}."),
    Spec(name="engine", kind="str", stages=(PLAN, "export", "evaluate"), default="vllm", choices=ENGINE_NAMES,
         help="The serving engine the child must load in; the search space, fusion and export keep to what it "
              "loads (puzzle/engines/rules.py)."),
    Spec(name="space", kind="mapping", stages=(PLAN,), metavar="YAML", validate=_space,
         default_text="fewer KV heads, linear and no-op attention; FFN widths 7/8..1/8, linear and no-op FFNs; "
                      "less what --engine cannot load",
         help="The search space: a YAML file holding a library config's space: section, e.g. "
              "{ffn: {sizes: [0.5, 0.25]}, attention: {kv_heads: [2]}}."),
    Spec(name="preset", kind="str", stages=(PLAN,), default="quick", choices=PRESET_NAMES,
         help="Stage sizes: quick (minutes on a laptop CPU), full (about 90 minutes for SmolLM2 on 2 CPU cores) or "
              "production (token counts that grow with the parent, from the Puzzle paper: docs/presets.md)."),
    # ---- stage sizes and research knobs
    Spec(name="bld_tokens", kind="int", stages=("library", "bld", "child_bld", "baselines"), presets=_sizes(4096, 65536, BLD_PER_BILLION),
         advanced=True, help="Tokens of block-wise local distillation of the library's variants."),
    Spec(name="bld_eval_sequences", kind="int", stages=("library", "bld", "child_bld", "baselines"), presets=_sizes(16, 16, 64),
         advanced=True, help="Sequences of 256 tokens that calibrate the variants' initialization and on which "
                             "BLD validates them, each."),
    Spec(name="quality_context", kind="int", stages=(PLAN, "solve", "child_bld", "gkd", "evaluate", "baselines"),
         default=DERIVED, advanced=True, at_least=2,
         default_text="the budget scenario's length (--context: decode's KV cache, prefill's prompt), at most the "
                      "parent's max_position_embeddings",
         help="Tokens per sequence of every stage that measures or trains quality after the library: replace-1 "
              "scoring (--score-seq-len), the finalists, child-aware BLD, GKD and the evaluation's headline "
              "figures; the library's BLD stays at 256 tokens."),
    Spec(name="score_sequences", kind="int", stages=("score",), presets=_sizes(1, 2, 8), advanced=True,
         help="Held-out sequences of replace-1-block scoring, each --score-seq-len tokens."),
    Spec(name="score_seq_len", kind="int", stages=("score",), default=DERIVED, advanced=True, at_least=2,
         default_text="the quality context", help="Tokens per scoring sequence."),
    Spec(name="finalists", kind="int", stages=("solve",), presets=_sizes(4, 8, 8), advanced=True,
         help="The MIP's best solutions that differ in at least a tenth of their layers, each assembled and its KL "
              "to the parent measured; the lowest goes on (1: the MIP's optimum). Layer-sharded on a cluster of several ranks, against the parent's cached top-64 log-probabilities."),
    Spec(name="refine_rounds", kind="int", stages=("solve",), presets=_sizes(0, 0, 0), advanced=True, at_least=0,
         help="Rounds of re-scoring the finalists' blocks around the best measured child and solving again "
              "(0: off). One process only: refused on a cluster of several ranks."),
    Spec(name="ffn_refit", kind="bool", stages=("library", "bld"), default=False, advanced=True,
         help="Refit each pruned FFN's down projection by least squares on the calibration tokens when the library "
              "is initialized (an (m, m) Gram matrix per layer in host memory)."),
    Spec(name="child_bld_tokens", kind="int", stages=("child_bld", "baselines"), presets=_sizes(16384, 131072, CHILD_BLD_PER_BILLION),
         advanced=True, at_least=0,
         help="Tokens of child-aware BLD: after the MIP, the child's replaced sub-blocks retrained on its own "
              "activations; 0 skips it. Layer-sharded on a cluster of several ranks."),
    Spec(name="child_refit", kind="bool", stages=("child_bld", "baselines"), presets=_sizes(False, True, True),
         advanced=True, help="Child-aware BLD first refits the child's pruned FFNs' down projections by least "
                             "squares on the child's own stream."),
    Spec(name="fuse_threshold", kind="float", stages=("fuse",), default=DERIVED, advanced=True, at_least=0,
         default_text="0.2 on GPUs, 0 on cpu, where one wide SwiGLU is slower than the narrow ones it replaces",
         help="Largest max-pairwise FFN dependency of a fused segment; 0 disables fusion."),
    Spec(name="fuse_sequences", kind="int", stages=("fuse", "baselines"), presets=_sizes(4, 8, 32), advanced=True,
         help="Calibration and held-out sequences of the fusion stage (and of the baselines' block influence)."),
    Spec(name="fuse_distill_steps", kind="int", stages=("fuse",), default=100, advanced=True, at_least=0,
         help="Local distillation steps of each fused block."),
    Spec(name="gkd_steps", kind="int", stages=("gkd", "baselines"), presets=_sizes(16, 200, GKD_PER_BILLION), advanced=True,
         at_least=0, help="Global distillation steps; 0 skips GKD."),
    Spec(name="gkd_batch", kind="int", stages=("gkd", "baselines"), presets=_sizes(1, 1, GKD_BATCH), advanced=True,
         help="Sequences per GKD step, each --quality-context tokens."),
    Spec(name="gkd_top_k", kind="int", stages=("gkd", "baselines"), presets=_sizes(64, 64, 0), advanced=True, at_least=0,
         help="The parent's top-k log-probabilities on the GKD tokens, cached once for the child and every "
              "baseline (layer-sharded on a cluster of several ranks, read by every FSDP2 rank); 0: a live parent every step."),
    Spec(name="eval_sequences", kind="int", stages=("solve", "gkd", "evaluate", "baselines"), presets=_sizes(2, 8, 32),
         advanced=True, help="Held-out sequences of the final evaluation, each --quality-context tokens (the report "
                             "adds as many tokens in sequences of 256 and of twice the quality context)."),
    Spec(name="measure_speed", kind="bool", stages=("evaluate", "baselines"), default=DERIVED, flag="--speed",
         default_text="on where the parent and the child fit a rank whole",
         help="Measure parent and child step time on this machine in the evaluation."),
    Spec(name="seed", kind="int", stages=("library", "bld", "child_bld", "gkd", "baselines"), default=0,
         advanced=True, at_least=0,
         help="Seed of the order of training sequences in BLD, child-aware BLD and GKD."),
])
"""Every setting of ``puzzle search``, in the order plans list them."""

PRESETS: dict[str, dict[str, Any]] = SETTINGS.presets()
"""``preset -> {setting: value}`` (read from :data:`SETTINGS`)."""
