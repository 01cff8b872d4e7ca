"""``puzzle export SOURCE --out DIR``: write a DeciLM / nemotron-nas checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.engines.rules import DEFAULT_ENGINE, ENGINE_NAMES

DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a DeciLM (nemotron-nas) checkpoint that vLLM / TensorRT-LLM / transformers load",
        description="Export a model to the DeciLM format: config.json with block_configs, safetensors "
        "weights, tokenizer files, and self-contained configuration_decilm.py / modeling_decilm.py "
        "(load with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)). The output is "
        "written to a temporary directory and renamed into place when complete.",
    )
    p.add_argument("source", help="embedded model name, Hugging Face parent directory, puzzle runtime "
                   "directory, or DeciLM directory")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="weight dtype of the export; auto keeps the source's stored dtype (default: auto)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory (never the source)")
    p.add_argument("--engine", choices=ENGINE_NAMES, default=DEFAULT_ENGINE, help="serving engine that must load the "
                   "export: a layer it cannot load is refused before anything is written (puzzle/engines/rules.py; "
                   "transformers loads every variant) (default: vllm)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from puzzle.engines import check_loadable, engine_rules, loaders
    from puzzle.export import export_decilm
    from puzzle.export.decilm import check_output
    from puzzle.loading import load_config, load_model, resolve_source

    src = resolve_source(args.source)
    config = load_config(src)
    check_loadable(engine_rules(args.engine), config.blocks, config, what=args.source)  # before any read or write
    check_output(Path(args.out), [src.directory], overwrite=args.force)  # before the weights are read
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    model = load_model(src, dtype=dtype)
    out = export_decilm(model, args.out, source_dir=src.directory, overwrite=args.force)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"exported {model.config.num_hidden_layers} layers ({next(model.parameters()).dtype}) to {out} "
          f"({size / 2**20:.1f} MiB)")
    print(f"engines that load it: {', '.join(loaders(config.blocks, config))}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0
