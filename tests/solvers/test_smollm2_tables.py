"""The MIP on the real parent's shapes: `puzzle solve` output feeds the runtime directly.

Costs are exact closed-form sizes of SmolLM2-135M's candidate blocks (puzzle.summary) with a
memory-bound decode-latency proxy (weight bytes / bandwidth); scores are a deterministic PROXY
(fraction of parameters removed, weighted by depth), standing in for the replace-1-block KL
that the scoring stage will produce. The check is the plumbing and the arithmetic: the chosen
architecture loads into the real parent's config, and the solver's parameter total equals the
parameter count of the model the runtime builds from it.
"""

from __future__ import annotations

import json
import math

import pandas as pd
import torch

from puzzle.cli.main import main
from puzzle.model import PuzzleForCausalLM
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig, load_blocks
from puzzle.summary import attention_params, ffn_params, kv_bytes_per_token, totals

ATTENTION = [AttentionConfig.gqa(3), AttentionConfig.gqa(1), AttentionConfig.linear(), AttentionConfig.no_op()]
FFN = [FFNConfig.swiglu(1536), FFNConfig.swiglu(1024), FFNConfig.swiglu(512), FFNConfig.linear(), FFNConfig.no_op()]


def _proxy_score(layer: int, a: AttentionConfig, f: FFNConfig, removed: float) -> float:
    """Convex in the removed fraction, with a per-layer, per-sub-block sensitivity (edges matter more)."""
    depth = 1.0 + 0.5 * math.cos(math.pi * layer / 29) ** 2 + 0.1 * (layer % 7) / 7
    attention_weight = {"gqa": 0.0, "linear": 0.6, "no_op": 1.0}[a.kind] * (0.5 + layer / 29)
    return depth * removed**2 + attention_weight * (1.0 if a.num_key_value_heads != 1 else 0.3) * 0.2


def _tables(config, tmp_path):
    parent_params = attention_params(ATTENTION[0], config) + ffn_params(FFN[0], config)
    rows = []
    for layer in range(config.num_hidden_layers):
        for a in ATTENTION:
            for f in FFN:
                params = attention_params(a, config) + ffn_params(f, config)
                removed = 1 - params / parent_params
                rows.append({
                    "layer": layer, "variant": BlockConfig(attention=a, ffn=f).label,
                    "params": params, "weight_bytes": 2 * params, "kv_bytes_per_token": kv_bytes_per_token(a, config),
                    "decode_ms": 2 * params / 3e9 * 1e3,  # bf16 weights streamed at 3 TB/s
                    "is_parent": a == ATTENTION[0] and f == FFN[0],
                    "proxy_kl": _proxy_score(layer, a, f, removed),
                })
    t = totals(config)
    df = pd.DataFrame(rows)
    fixed = {"layer": -1, "variant": "fixed", "params": t.embedding_params, "weight_bytes": 2 * t.embedding_params,
             "kv_bytes_per_token": 0, "decode_ms": 2 * t.embedding_params / 3e9 * 1e3}
    costs = pd.concat([df.drop(columns=["proxy_kl"]), pd.DataFrame([fixed])], ignore_index=True)
    costs.to_csv(tmp_path / "costs.csv", index=False)
    df[["layer", "variant", "proxy_kl"]].to_csv(tmp_path / "scores.csv", index=False)


def test_solution_for_smollm2_shapes_builds_a_runtime_model(smollm2, tmp_path, capsys):
    config = smollm2.config
    _tables(config, tmp_path)
    out = tmp_path / "arch.json"
    code = main(["solve", "--scores", str(tmp_path / "scores.csv"), "--costs", str(tmp_path / "costs.csv"),
                 "--speedup", "1.5", "--constraint", "count(attention != no_op) >= 10",
                 "--constraint", "layer[0] == parent", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    solution = json.loads(out.read_text())
    blocks = load_blocks(out)
    assert len(blocks) == 30 and blocks[0] == BlockConfig(attention=ATTENTION[0], ffn=FFN[0])
    assert sum(b.attention.kind != "no_op" for b in blocks) >= 10
    assert solution["totals"]["speedup"] >= 1.5 - 1e-9
    child_config = config.with_blocks(blocks)
    with torch.device("meta"):
        child = PuzzleForCausalLM(child_config)
    assert sum(p.numel() for p in child.parameters()) == solution["totals"]["params"]
    assert solution["totals"]["params"] < totals(config).params / 1.4  # a real compression
