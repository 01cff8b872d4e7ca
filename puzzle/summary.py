"""Closed-form sizes of an architecture: per-layer parameters, KV-cache bytes, totals.

Counts come from the config alone (no weights), so ``puzzle inspect`` is instant and the
profiler and MIP can use the same numbers. A test checks them against the instantiated model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from puzzle.model import PuzzleConfig
from puzzle.schema import AttentionConfig, FFNConfig


def attention_params(attention: AttentionConfig, config: PuzzleConfig) -> int:
    """Parameters of an attention sub-block, its RMSNorm included."""
    h, nh, hd = config.hidden_size, config.num_attention_heads, config.head_dim
    if attention.kind == "no_op":
        return 0
    if attention.kind == "linear":
        return h * h + h
    nkv = attention.num_key_value_heads
    qkv_bias = config.qkv_bias if config.qkv_bias is not None else config.attention_bias
    weights = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
    bias = (nh * hd + 2 * nkv * hd if qkv_bias else 0) + (h if config.attention_bias else 0)
    return weights + bias + h


def ffn_params(ffn: FFNConfig, config: PuzzleConfig) -> int:
    """Parameters of an FFN sub-block, its RMSNorm included."""
    h = config.hidden_size
    if ffn.kind == "no_op":
        return 0
    if ffn.kind == "linear":
        return h * h + h
    m = ffn.intermediate_size
    return 3 * h * m + (2 * m + h if config.mlp_bias else 0) + h


def kv_bytes_per_token(attention: AttentionConfig, config: PuzzleConfig, *, bytes_per_value: int = 2) -> int:
    """KV-cache bytes one token costs in this layer (keys and values; bf16 by default)."""
    if attention.kind != "gqa":
        return 0
    return 2 * attention.num_key_value_heads * config.head_dim * bytes_per_value


@dataclass(frozen=True)
class Totals:
    params: int
    """All parameters, embeddings and LM head included (a tied head counted once)."""
    block_params: int
    """Parameters in the decoder layers."""
    embedding_params: int
    """Token embedding + untied LM head + final norm."""
    kv_bytes_per_token: int
    """KV-cache bytes per token over all layers, bf16."""
    attention_layers: int
    ffn_layers: int


def layer_table(config: PuzzleConfig) -> pd.DataFrame:
    """One row per layer: kinds, sizes, parameters and KV bytes per token."""
    rows: list[dict[str, Any]] = []
    for i, b in enumerate(config.blocks):
        a, f = b.attention, b.ffn
        pa, pf = attention_params(a, config), ffn_params(f, config)
        rows.append({
            "layer": i,
            "attention": a.kind,
            "kv_heads": a.num_key_value_heads if a.kind == "gqa" else None,
            "ffn": f.kind,
            "ffn_size": f.intermediate_size if f.kind == "swiglu" else None,
            "attn_params": pa,
            "ffn_params": pf,
            "params": pa + pf,
            "kv_bytes_per_token": kv_bytes_per_token(a, config),
        })
    df = pd.DataFrame(rows)
    return df.astype({"kv_heads": "Int64", "ffn_size": "Int64"})


def totals(config: PuzzleConfig) -> Totals:
    table = layer_table(config)
    emb = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2) + config.hidden_size
    block = int(table["params"].sum())
    return Totals(
        params=block + emb,
        block_params=block,
        embedding_params=emb,
        kv_bytes_per_token=int(table["kv_bytes_per_token"].sum()),
        attention_layers=int((table["attention"] != "no_op").sum()),
        ffn_layers=int((table["ffn"] != "no_op").sum()),
    )


def format_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
