"""``puzzle inspect SOURCE``: a per-layer table of an architecture and its totals."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a model's per-layer architecture and totals",
        description="Print one row per layer (attention kind, KV heads, FFN kind and size, parameters, "
        "KV-cache bytes per token) and the totals. Reads config.json only; no weights are loaded.",
    )
    p.add_argument("source", help="embedded model name (smollm2-135m), a Hugging Face Llama/Mistral/Qwen2 "
                   "directory, a puzzle runtime directory, an exported DeciLM directory, or a block library "
                   "(then its variant table is shown)")
    p.add_argument("--json", action="store_true", help="print JSON (layers and totals) instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from block_library.artifact import is_library

    if is_library(args.source):
        return _show_library(args)
    from puzzle.loading import load_config, resolve_source
    from puzzle.summary import format_count, layer_table, totals

    src = resolve_source(args.source)
    config = load_config(src)
    table, tot = layer_table(config), totals(config)
    if args.json:
        layers = json.loads(table.to_json(orient="records"))
        print(json.dumps({"source": str(src.directory), "kind": src.kind, "layers": layers, "totals": tot.__dict__}, indent=2))
        return 0
    print(f"{args.source}  [{src.kind}: {src.directory}]")
    print(
        f"hidden {config.hidden_size}, heads {config.num_attention_heads} x {config.head_dim}, "
        f"vocab {config.vocab_size}, tied embeddings {config.tie_word_embeddings}, "
        f"rope {config.rope_parameters.get('rope_type', 'default')} (theta {config.rope_parameters['rope_theta']:g})"
    )
    shown = table.copy()
    for col in ("attn_params", "ffn_params", "params"):
        shown[col] = shown[col].map(format_count)
    shown["kv_heads"] = shown["kv_heads"].astype(object).where(shown["kv_heads"].notna(), "-")
    shown["ffn_size"] = shown["ffn_size"].astype(object).where(shown["ffn_size"].notna(), "-")
    print(shown.to_string(index=False))
    print(
        f"total {format_count(tot.params)} params ({format_count(tot.block_params)} in layers, "
        f"{format_count(tot.embedding_params)} embeddings/head) | {tot.attention_layers} attention layers, "
        f"{tot.ffn_layers} FFN layers | KV cache {tot.kv_bytes_per_token / 1024:.1f} KiB/token (bf16)"
    )
    return 0


def _show_library(args: argparse.Namespace) -> int:
    from block_library import open_library
    from puzzle.cli.library_cmd import format_table

    lib = open_library(args.source)
    if args.json:
        rows = json.loads(lib.table.to_json(orient="records"))
        print(json.dumps({"source": str(lib.directory), "kind": "library", "status": lib.status, "variants": rows}, indent=2))
    else:
        print(format_table(lib))
    return 0
