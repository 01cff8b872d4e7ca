"""What-if searches by shape: a parent given by its config numbers alone, costed by the profiler and
searched by the MIP with PROXY scores (no weights, so no real quality loss).

    spec = LLAMA_31["70B"]
    table, problem = whatif_problem(spec, parse_target("8xH100"), decode=..., prefill=..., speedup=2.0)
    blocks = blocks_from_list(solve(problem).block_configs())
    fused = fuse_all_runs(blocks, max_width=8 * spec.intermediate_size)

The proxy quality loss of a block is the share of its sub-blocks' parameters it removes (attention
and FFN counted half each; a linear replacement counts as the fixed damage ``benchmarks/mip_scale.py``
assumes), weighted by a layer-position importance and normalized so that removing every layer costs
1.0: the parameter-share proxy of ``benchmarks/realized_speedup.py`` with a position weight. It only
decides *which* child the MIP picks at a given cost; its values are not predictions of quality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from puzzle.fusion.runs import Segment, choose_segments, find_runs, fused_blocks
from puzzle.profiler.counts import ModelShape, block_params, fixed_params
from puzzle.profiler.deployment import memory_per_device as _device_bytes
from puzzle.profiler.hardware import Target
from puzzle.profiler.roofline import model_ms
from puzzle.profiler.scenario import Scenario
from puzzle.profiler.table import cost_table
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig
from puzzle.summary import attention_params, ffn_params
from solvers import Budget, Problem
from solvers.expressions import total
from solvers.io import problem_from_tables

SCORE = "proxy_loss"
KV_HEADS = (8, 4, 2, 1)
FFN_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.1)


@dataclass(frozen=True, kw_only=True)
class ParentSpec:
    """A homogeneous Llama-family parent by its Hugging Face config numbers."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    rope_theta: float = 500000.0
    """Not a cost (RoPE is elementwise), kept so the spec is the whole config that matters."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def shape(self) -> ModelShape:
        return ModelShape(hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                          head_dim=self.head_dim, vocab_size=self.vocab_size,
                          tie_word_embeddings=self.tie_word_embeddings)

    def parent_block(self) -> BlockConfig:
        return BlockConfig(attention=AttentionConfig.gqa(self.num_key_value_heads),
                           ffn=FFNConfig.swiglu(self.intermediate_size))

    def blocks(self) -> list[BlockConfig]:
        return [self.parent_block()] * self.num_layers


# Llama-3.1 configs (meta-llama/Llama-3.1-{8B,70B,405B} config.json).
LLAMA_31: dict[str, ParentSpec] = {
    "8B": ParentSpec(name="Llama-3.1-8B", num_layers=32, hidden_size=4096, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256),
    "70B": ParentSpec(name="Llama-3.1-70B", num_layers=80, hidden_size=8192, num_attention_heads=64,
                      num_key_value_heads=8, intermediate_size=28672, vocab_size=128256),
    "405B": ParentSpec(name="Llama-3.1-405B", num_layers=126, hidden_size=16384, num_attention_heads=128,
                       num_key_value_heads=8, intermediate_size=53248, vocab_size=128256),
}


def search_space(spec: ParentSpec, *, kv_heads: Sequence[int] = KV_HEADS,
                 ffn_fractions: Sequence[float] = FFN_FRACTIONS) -> list[BlockConfig]:
    """Every attention variant x FFN variant of one layer, the parent's block first.

    Attention: GQA with each of ``kv_heads``, linear, no-op; FFN: SwiGLU at each fraction of the
    parent's width (rounded to a multiple of 256, so tensor-parallel splits are even), linear, no-op.
    """
    atts = [AttentionConfig.gqa(k) for k in kv_heads] + [AttentionConfig.linear(), AttentionConfig.no_op()]
    widths = sorted({max(256, round(spec.intermediate_size * f / 256) * 256) for f in ffn_fractions}, reverse=True)
    ffns = [FFNConfig.swiglu(m) for m in widths] + [FFNConfig.linear(), FFNConfig.no_op()]
    blocks = [BlockConfig(attention=a, ffn=f) for a in atts for f in ffns]
    parent = spec.parent_block()
    if parent not in blocks:
        raise ValueError(f"{spec.name}: the parent block {parent.label} is not in the search space")
    return sorted(blocks, key=lambda b: b != parent)  # stable: parent first, then the grid order


def layer_importance(layer: int, num_layers: int) -> float:
    """Proxy weight of a layer: U-shaped in depth (first and last layers matter most), early > late.

    1.5 at layer 0, about 1.0 in the middle, 1.4 at the last layer; the slight tilt breaks the
    symmetry so that solutions are unique.
    """
    x = layer / max(1, num_layers - 1)
    return 1.0 + 0.4 * math.cos(math.pi * x) ** 2 + 0.1 * (1.0 - x)


# Relative damage of replacing a sub-block by one linear map: the values benchmarks/mip_scale.py
# assumes (a linear map keeps little of what attention's token mixing or an FFN's gating did).
LINEAR_DAMAGE = {"attention": 0.6, "ffn": 0.9}


def sub_block_damage(spec: ParentSpec, block: BlockConfig) -> tuple[float, float]:
    """(attention, FFN) damage in [0, 1]: share of the parent sub-block's parameters removed
    (GQA with fewer KV heads, narrower SwiGLU), :data:`LINEAR_DAMAGE` for linear, 1 for no-op."""
    shape, parent = spec.shape(), spec.parent_block()
    out = []
    for part, mine, full in (("attention", block.attention, parent.attention), ("ffn", block.ffn, parent.ffn)):
        if mine.kind == "no_op":
            out.append(1.0)
        elif mine.kind == "linear":
            out.append(LINEAR_DAMAGE[part])
        else:
            count = attention_params if part == "attention" else ffn_params
            out.append(max(0.0, 1.0 - count(mine, shape) / count(full, shape)))
    return out[0], out[1]


def proxy_scores(spec: ParentSpec, candidates: Sequence[Sequence[BlockConfig]]) -> pd.DataFrame:
    """Rows ``(layer, variant, proxy_loss)``: layer importance x mean damage of the two sub-blocks.

    Attention and FFN count half each (a plain share of the layer's parameters would make dropping
    attention, a sixth of a Llama layer, nearly free). Normalized so that the sum over layers of
    removing everything is 1.0.
    """
    n = len(candidates)
    norm = sum(layer_importance(i, n) for i in range(n))
    damage = {b: sub_block_damage(spec, b) for b in {b for blocks in candidates for b in blocks}}
    rows = []
    for layer, blocks in enumerate(candidates):
        w = layer_importance(layer, n) / norm
        rows += [{"layer": layer, "variant": b.label, SCORE: w * 0.5 * sum(damage[b])} for b in blocks]
    return pd.DataFrame(rows)


def whatif_problem(spec: ParentSpec, target: Target, *, decode: Scenario, prefill: Scenario,
                   speedup: float | None = None, memory_bytes: float | None = None,
                   max_loss: float | None = None, space: Sequence[BlockConfig] | None = None
                   ) -> tuple[pd.DataFrame, Problem]:
    """The cost table of ``spec`` on ``target`` and the MIP over it (speedup on the decode step).

    ``memory_bytes`` caps weights + KV cache (decode batch x kv_tokens) per device; ``max_loss``
    caps the total proxy loss (a child that dropped more is not worth distilling).
    """
    space = list(space or search_space(spec))
    candidates = [space] * spec.num_layers  # (layers, variants): every layer has the same choices
    costs = cost_table(spec.shape(), candidates, spec.blocks(), target=target, scenarios=[decode, prefill])
    scores = proxy_scores(spec, candidates)
    constraints = [total(SCORE) <= max_loss] if max_loss is not None else []
    problem = problem_from_tables(scores, costs, score_column=SCORE,
                                  budget=Budget(speedup=speedup, memory_bytes=memory_bytes),
                                  scenario=decode,
                                  constraints=tuple(constraints))
    return costs, problem


def fusion_segments(blocks: Sequence[BlockConfig], *, max_width: int | None) -> list[Segment]:
    """Every maximal attention-free SwiGLU run, cut into the fewest segments of fused width <= ``max_width``.

    A shape-only study has no activations to measure dependencies on, so every pair counts as
    independent (dependency 0): the segments are limited by width alone.
    """
    out: list[Segment] = []
    for run in find_runs(blocks):
        widths = [blocks[i].ffn.intermediate_size for i in run.layers]
        zeros = [[0.0] * len(run) for _ in run.layers]  # (n, n) pairwise dependency, all independent
        out += choose_segments(run, zeros, widths, threshold=0.0, max_width=max_width)
    return out


def drop_identity(blocks: Sequence[BlockConfig]) -> list[BlockConfig]:
    """The layers that compute something: a block with no-op attention and no-op FFN is ``x -> x``."""
    return [b for b in blocks if not (b.attention.kind == "no_op" and b.ffn.kind == "no_op")]


def fuse_all_runs(blocks: Sequence[BlockConfig], *, max_width: int | None) -> list[BlockConfig]:
    """The architecture after dropping identity layers (they cost nothing, but would split runs) and
    fusing :func:`fusion_segments` of the rest: fewer layers, the same parameters bar some norms."""
    kept = drop_identity(blocks)
    return fused_blocks(kept, fusion_segments(kept, max_width=max_width))[0]


def memory_per_device(spec: ParentSpec, blocks: Sequence[BlockConfig], target: Target, decode: Scenario) -> float:
    """Weights + KV cache (decode batch x kv_tokens) + embeddings and head, bytes on the most loaded device
    (each replica has its own devices, so ``decode.replicas`` does not change it)."""
    return _device_bytes(spec.shape(), blocks, dtype=target.dtype, tp=target.tp, batch=decode.batch,
                         kv_tokens=decode.kv_tokens)


def evaluate(spec: ParentSpec, blocks: Sequence[BlockConfig], target: Target, *, decode: Scenario,
             prefill: Scenario) -> dict[str, float]:
    """Predicted step times, throughputs (of the whole target: all replicas) and memory per device of one
    architecture (any layer count)."""
    shape = spec.shape()
    decode_ms, prefill_ms = model_ms(shape, blocks, decode, target), model_ms(shape, blocks, prefill, target)
    return {"layers": len(blocks), "decode_ms": decode_ms, "prefill_ms": prefill_ms,
            "decode_tok_s": decode.throughput(decode_ms),  # replicas x batch sequences x 1 token per step
            "prefill_tok_s": prefill.throughput(prefill_ms),  # replicas x batch x prompt tokens per step
            "memory_gb": memory_per_device(spec, blocks, target, decode) / 1e9,
            "params_b": (sum(block_params(shape, b) for b in blocks) + fixed_params(shape)) / 1e9}
