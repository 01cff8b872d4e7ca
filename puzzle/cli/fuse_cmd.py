"""``puzzle fuse``: FFN fusion of an architecture or an exported checkpoint.

    puzzle fuse runs/child --out runs/fused                              # an exported / runtime child
    puzzle fuse runs/lib --arch runs/solution.json --out runs/fused      # a MIP solution over a library
    puzzle fuse smollm2-135m --no-attention 14-25 --out runs/fused       # attention removed by hand
    puzzle fuse runs/child --segments 20-23,25-27 --distill-steps 50 --out runs/fused

Finds the runs of attention-free SwiGLU layers, measures how much each FFN depends on the ones
before it, fuses the segments whose largest pairwise dependency is below ``--threshold`` (or exactly
``--segments``), and reports per segment the dependency, the KL of the fused model to the
unfused one, and the latency change predicted for each ``--target`` and measured here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.engines.rules import DEFAULT_ENGINE, ENGINE_NAMES
from puzzle.profiler.hardware import DEFAULT_TARGET


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuse", help="fuse runs of attention-free FFNs into one wide parallel FFN",
                       description="FFN fusion (arXiv 2503.18908): runs of consecutive layers whose attention is "
                       "no_op become one wider SwiGLU applied to the run's input, with each layer's RMSNorm weight "
                       "folded into its rows. Writes the fused model as a DeciLM checkpoint plus report.csv, "
                       "latency.csv, dependency.json/.png and blocks.json, atomically.")
    p.add_argument("source", help="a model (exported DeciLM or runtime directory, HF directory, embedded name) or, "
                   "with --arch, a block library")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--arch", help="architecture to fuse: JSON/YAML block configs, e.g. a `puzzle solve` solution. "
                   "With a library SOURCE its variants supply the weights; with a model SOURCE every sub-block "
                   "must be the model's own or no_op")
    p.add_argument("--no-attention", metavar="LAYERS", help="remove attention from these layers of SOURCE first "
                   "(ranges like 14-25,27), an attention-removed child by hand")
    p.add_argument("--parent", help="the parent of an exported child SOURCE (embedded name or directory): adds "
                   "the KL to the parent before and after fusion (known already for --arch / --no-attention)")
    p.add_argument("--segments", metavar="LAYERS", help="fuse exactly these ranges (e.g. 20-23,25-27) instead of "
                   "choosing by --threshold")
    p.add_argument("--threshold", type=float, default=0.2, help="largest segment score (pairwise dependency, "
                   "a cosine distance 0..2) of a fused segment (default: 0.2)")
    p.add_argument("--score", choices=("max", "mean"), default="max", help="segment score compared with "
                   "--threshold: max of its pairwise dependencies (every pair independent enough) or their mean "
                   "(the paper's run-level view; lets long runs through on small models) (default: max)")
    p.add_argument("--max-segment-kl", type=float, default=0.1, help="leave a chosen segment unfused when fusing it "
                   "alone costs more KL to the unfused model than this (default: 0.1); a negative value turns the "
                   "guard off")
    p.add_argument("--max-width-mult", type=float, default=8.0, help="largest fused width as a multiple of the "
                   "parent FFN width (default: 8, as Nemotron-Ultra); 0 for no limit")
    p.add_argument("--data", nargs="+", default=["stdlib"], help="corpus: train split calibrates, validation "
                   "split evaluates (default: stdlib)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--sequences", type=int, default=8, help="calibration and held-out sequences each (default: 8)")
    p.add_argument("--distill-steps", type=int, default=0, help="local distillation steps of each fused block "
                   "against its sequential run (default: 0, exact fusion only)")
    p.add_argument("--distill-lr", type=float, default=1e-4, help="learning rate of that distillation (default: 1e-4)")
    p.add_argument("--target", action="append", default=None, help="target whose latency to predict, repeatable: "
                   f"COUNTxGPU (one node of COUNT GPUs) or cpu for this machine (default: {DEFAULT_TARGET})")
    p.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16", help="GPU targets' dtype (default: bf16)")
    p.add_argument("--no-measure", action="store_true", help="do not time the models on this machine")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (never the source)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--engine", choices=ENGINE_NAMES, default=DEFAULT_ENGINE, help="serving engine that must load the "
                   "fused model: a model or fused width it cannot load is refused before anything is written "
                   "(puzzle/engines/rules.py) (default: vllm)")
    p.set_defaults(func=run)


def _models(args: argparse.Namespace):  # noqa: ANN202
    """(model to fuse, parent or None, source directory, tokenizer)."""
    from block_library import is_library, open_library
    from puzzle.errors import ConfigError
    from puzzle.fusion.derive import derive_model, without_attention
    from puzzle.fusion.runs import parse_segments
    from puzzle.loading import load_model, load_tokenizer, resolve_source
    from puzzle.schema import load_blocks

    if is_library(args.source):
        if not args.arch:
            raise ConfigError(f"{args.source} is a block library: pass --arch (e.g. a `puzzle solve` solution)")
        lib = open_library(args.source)
        src = resolve_source(lib.manifest["parent"]["directory"])
        model, parent = lib.assemble(load_blocks(args.arch)), load_model(src)
    else:
        src = resolve_source(args.source)
        model = parent = load_model(src)
        if args.arch:
            model = derive_model(parent, load_blocks(args.arch))
        else:  # an exported child: its parent only if given
            parent = load_model(resolve_source(args.parent)) if args.parent else None
    if args.no_attention:
        layers = [i for s in parse_segments(args.no_attention) for i in s.layers]
        base = parent if parent is not None else model
        model = derive_model(model, without_attention(model.config.blocks, layers))
        parent = base
    return model, parent, src, load_tokenizer(src)


def run(args: argparse.Namespace) -> int:
    from puzzle.fusion import FusionConfig, fuse_and_report
    from puzzle.fusion.artifact import write_fusion
    from puzzle.engines import check_loadable, engine_rules
    from puzzle.errors import ConfigError
    from puzzle.fusion.runs import find_runs, parse_segments

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ConfigError(f"{out} already exists and is not empty; choose another --out or pass --force")
    model, parent, src, tokenizer = _models(args)
    rules = engine_rules(args.engine)
    check_loadable(rules, model.config.blocks, model.config, what=f"{args.source} (before fusion)")
    for protected in {src.directory.resolve(), Path(args.source).resolve()}:
        if out.resolve() == protected or protected in out.resolve().parents:
            raise ConfigError(f"--out {out} is inside the source {protected}; never write there")
    cfg = FusionConfig(threshold=args.threshold, score=args.score,
                       max_segment_kl=None if args.max_segment_kl < 0 else args.max_segment_kl, max_width_mult=args.max_width_mult or None,
                       segments=tuple(parse_segments(args.segments)) if args.segments else None,
                       sources=tuple(args.data), seq_len=args.seq_len, calib_sequences=args.sequences,
                       eval_sequences=args.sequences, distill_steps=args.distill_steps, distill_lr=args.distill_lr,
                       targets=tuple(args.target or (DEFAULT_TARGET,)), dtype=args.dtype, measure=not args.no_measure)
    runs = find_runs(model.config.blocks)
    print(f"{model.config.num_hidden_layers} layers; attention-free SwiGLU runs: "
          f"{', '.join(r.label for r in runs) or 'none'}")
    result = fuse_and_report(model, tokenizer, cfg, parent=parent, progress=not args.no_progress)
    check_loadable(rules, result.model.config.blocks, result.model.config, what="the fused model")
    out = write_fusion(result, args.out, config=cfg, source=args.source, source_dir=src.directory,
                       overwrite=args.force)
    print(format_report(result))
    print(f"fused {len(result.segments)} segment(s): {model.config.num_hidden_layers} -> "
          f"{result.model.config.num_hidden_layers} layers; wrote {out} (model in {out / 'model'})")
    return 0


def format_report(result) -> str:  # noqa: ANN001
    """The report and latency tables as fixed-width text."""
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.4g}".format):
        rep = result.report.drop(columns=[c for c in result.report.columns if c.endswith("_saved_ms")])
        return f"{rep.to_string(index=False)}\n\n{result.latency.to_string(index=False)}"
