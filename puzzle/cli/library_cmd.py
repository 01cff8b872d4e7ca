"""``puzzle library build | train | show``: the block library and its local distillation (BLD).

    puzzle library build smollm2-135m --out runs/lib [--config library.yaml]
    puzzle library train runs/lib [--tokens 131072 --lr 1e-3]     # resumes after an interruption
    puzzle library show runs/lib                                   # the index table
    puzzle library assemble runs/lib --arch solution.json --out runs/child   # a runtime checkpoint
    torchrun --nproc-per-node 2 -m puzzle.cli.main library train runs/lib   # layers sharded over ranks
    puzzle library train runs/lib --max-memory-per-rank 80GB       # variants in rounds that fit
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("library", help="build a block library and train it with BLD",
                       description="Per-layer candidate variants initialized from the parent (build), then trained "
                       "by block-wise local distillation (train). Under torchrun, layers are sharded over processes.")
    lsub = p.add_subparsers(dest="library_command", metavar="ACTION", help="build, train or show")
    lsub.required = True

    b = lsub.add_parser("build", help="initialize every variant of the search space from the parent",
                        description="Resolve the search space, gather calibration statistics in one parent pass, "
                        "initialize every variant (KV pooling, importance pruning, least squares) and score it on "
                        "validation data. Writes a library directory atomically.")
    b.add_argument("source", help="parent: embedded name (smollm2-135m) or a model directory")
    b.add_argument("--out", required=True, help="library directory to create")
    b.add_argument("--config", help="YAML with optional space / bld / data sections (see block_library/config.py)")
    b.add_argument("--data", nargs="+", help="corpus sources (stdlib, text files, directories, .jsonl, .parquet)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing --out directory once the new one is complete")
    _bld_flags(b)
    _memory_flag(b)
    b.add_argument("--train", action="store_true", help="run BLD right after building")
    b.set_defaults(func=run_build)

    t = lsub.add_parser("train", help="block-wise local distillation of a built library (resumable)",
                        description="Train every variant to imitate its parent sub-block on the parent's activations "
                        "(normalized MSE). Checkpoints every --checkpoint-every steps; rerun to resume.")
    t.add_argument("library", help="a directory written by `puzzle library build`")
    _bld_flags(t)
    _memory_flag(t)
    t.set_defaults(func=run_train)

    a = lsub.add_parser("assemble", help="build a runtime model from a library and an architecture",
                        description="Take every sub-block of an architecture (JSON/YAML with block_configs, e.g. "
                        "the output of `puzzle solve`) from the library and save a runtime checkpoint.")
    a.add_argument("library", help="a library directory")
    a.add_argument("--arch", required=True, help="architecture file (JSON or YAML with block_configs)")
    a.add_argument("--out", required=True, help="directory for the runtime checkpoint (loadable by every puzzle command)")
    a.add_argument("--initial", action="store_true", help="use the variants as initialized, before BLD")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    a.set_defaults(func=run_assemble)

    s = lsub.add_parser("show", help="print a library's table", description="One row per (layer, sub-block, variant): "
                        "parameters, initial and final validation normalized MSE.")
    s.add_argument("library", help="a library directory")
    s.add_argument("--layer", type=int, help="only this layer")
    s.set_defaults(func=run_show)


def _bld_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("BLD settings (override the config's bld section)")
    g.add_argument("--tokens", type=int, help="training tokens every variant sees")
    g.add_argument("--batch-size", type=int, help="sequences per step")
    g.add_argument("--lr", type=float, help="peak AdamW learning rate")
    g.add_argument("--checkpoint-every", type=int, help="steps between resumable checkpoints (0: none)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device (auto: CUDA when present)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _memory_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-memory-per-rank", metavar="SIZE",
                   help="memory limit of each process (80GB, 6GiB, 512MiB): variants that do not fit at once are "
                   "initialized / trained in rounds, each replaying the parent passes (same results, more time)")


def _max_memory(args: argparse.Namespace) -> int | None:
    from block_library.rounds import parse_size

    return None if args.max_memory_per_rank is None else parse_size(args.max_memory_per_rank)


def _overrides(args: argparse.Namespace) -> dict:
    return {"tokens": args.tokens, "batch_size": args.batch_size, "lr": args.lr,
            "checkpoint_every": args.checkpoint_every, "dtype": args.dtype, "device": args.device}


def run_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from block_library import LibraryConfig, build_library, train_library
    from puzzle.data import DataConfig

    cfg = LibraryConfig.from_file(args.config) if args.config else LibraryConfig()
    if args.data:
        cfg = replace(cfg, data=DataConfig(**{**cfg.data.to_dict(), "sources": tuple(args.data)}))
    cfg = cfg.with_bld(**_overrides(args))
    limit = _max_memory(args)
    out = build_library(args.source, args.out, cfg, overwrite=args.overwrite, progress=not args.no_progress,
                        max_memory_bytes=limit)
    if args.train:
        train_library(out, progress=not args.no_progress, max_memory_bytes=limit)
    _print_summary(out)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from block_library import open_library, train_library

    limit = _max_memory(args)
    cfg = open_library(args.library).config.with_bld(**_overrides(args))
    train_library(args.library, config=cfg, progress=not args.no_progress, max_memory_bytes=limit)
    _print_summary(args.library)
    return 0


def run_assemble(args: argparse.Namespace) -> int:
    from block_library import open_library
    from puzzle.loading import Source, save_runtime
    from puzzle.schema import load_blocks
    from puzzle.summary import format_count, totals

    lib = open_library(args.library)
    model = lib.assemble(load_blocks(args.arch), initial=args.initial)
    save_runtime(model, args.out, source=Source(name=str(lib.directory), kind="runtime", directory=lib.directory),
                 overwrite=args.overwrite)
    print(f"{args.out}: {format_count(totals(model.config).params)} params, from {lib.directory} "
          f"({'initial' if args.initial else lib.status} variants)")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from block_library import open_library

    lib = open_library(args.library)
    print(format_table(lib, layer=args.layer))
    return 0


def format_table(lib, *, layer: int | None = None) -> str:
    """The index as text: one row per variant, NMSE before and after BLD."""
    from puzzle.summary import format_count

    t = lib.table.copy()
    if layer is not None:
        t = t[t.layer == layer]
    t["params"] = t["params"].map(format_count)
    for c in ("init_val_nmse", "final_val_nmse"):
        t[c] = t[c].map(lambda v: f"{v:.5f}")
    cols = ["layer", "subblock", "variant", "params", "init_val_nmse", "final_val_nmse", "trained"]
    head = f"library {lib.directory} [{lib.status}] parent {lib.manifest['parent']['source']}"
    return head + "\n" + t[cols].to_string(index=False)


def _print_summary(directory) -> None:
    import os

    from block_library import open_library

    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return

    lib = open_library(directory)
    t = lib.table
    tr = t[t.trained.astype(bool)]
    line = f"{directory}: {len(t)} variants over {t.layer.nunique()} layers [{lib.status}]"
    if len(tr):
        better = int((tr.final_val_nmse < tr.init_val_nmse).sum())
        line += (f"; {better}/{len(tr)} trained variants improved their validation NMSE "
                 f"(median {tr.init_val_nmse.median():.4f} -> {tr.final_val_nmse.median():.4f})")
    print(line)
