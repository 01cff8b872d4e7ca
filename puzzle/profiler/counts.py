"""What each block variant costs, in closed form: FLOPs, bytes moved, kernels, parameters.

Everything is per tensor-parallel rank (the slowest one): with ``tp`` ranks a layer's query heads,
KV heads, FFN channels and linear columns are split ``ceil(n / tp)`` per rank, and KV heads are
replicated when there are fewer of them than ranks (as vLLM and TensorRT-LLM do). After every
attention or FFN that is not a no-op, the ranks sum their partial outputs in one all-reduce.

Notation (shapes in the comments): B batch, T new tokens per sequence (prompt in prefill, 1 in
decode), S keys each query attends to (T in prefill, cache + 1 in decode), H hidden, nh / nkv
query / KV heads of the rank, hd head width, m FFN width of the rank, V vocabulary; ``w`` bytes
per weight (2 bf16, 1 fp8, 4 fp32), ``a`` bytes per activation and KV element (2 on GPUs, even
with fp8 weights; 4 in fp32). Prefill attention is causal, so each query sees (T + 1) / 2 keys
on average. Kernel counts are those of the eager runtime (``puzzle/model/modeling.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from puzzle.profiler.devices import DTYPE_BYTES
from puzzle.profiler.scenario import Scenario
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig
from puzzle.summary import attention_params, ffn_params

NORM_KERNELS = 6  # float(), pow, mean, +eps/rsqrt, mul, weight mul
ROPE_KERNELS = 12  # per q and k: two slices, neg, cat, two muls, add
RESIDUAL_KERNELS = 1


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model needs, read from a runtime config (``PuzzleConfig``) or given."""

    hidden_size: int
    num_attention_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        qkv_bias = config.qkv_bias if config.qkv_bias is not None else config.attention_bias
        return cls(hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
                   head_dim=config.head_dim, vocab_size=config.vocab_size,
                   tie_word_embeddings=bool(config.tie_word_embeddings), qkv_bias=bool(qkv_bias),
                   attention_bias=bool(config.attention_bias), mlp_bias=bool(config.mlp_bias))


@dataclass(frozen=True)
class Op:
    """One kernel group on one rank: FLOPs at a dtype's rate, bytes through memory, or a collective."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    """Device-memory traffic, reads plus writes."""
    kernels: int = 1
    dtype: str = "bf16"
    """Whose FLOP/s rate applies: the GEMM dtype, or the activation dtype for everything else."""
    allreduce_bytes: float = 0.0
    """Payload of an all-reduce across the tensor-parallel ranks (then flops and bytes are 0)."""


def act_bytes(dtype: str) -> int:
    """Bytes per activation / KV element: fp32 stays fp32, everything else computes in 16 bits."""
    return 4 if dtype == "fp32" else 2


def act_dtype(dtype: str) -> str:
    return "fp32" if dtype == "fp32" else "bf16"


def split(n: int, tp: int) -> int:
    """Share of ``n`` units on the most loaded of ``tp`` ranks (units are replicated when n < tp)."""
    return math.ceil(n / tp)


def gemm(name: str, rows: float, k: float, n: float, dtype: str, *, out_bytes: int | None = None) -> Op:
    """``(rows, k) @ (k, n)``: 2 rows k n FLOPs; reads both operands, writes the output."""
    w = DTYPE_BYTES[dtype]
    o = act_bytes(dtype) if out_bytes is None else out_bytes
    return Op(name, flops=2.0 * rows * k * n, bytes=w * (k * n + rows * k) + o * rows * n, dtype=dtype)


def elementwise(name: str, elements: float, dtype: str, *, kernels: int, passes: float = 2.0) -> Op:
    """A memory-bound kernel group touching ``elements`` values ``passes`` times (read + write = 2)."""
    return Op(name, bytes=passes * elements * act_bytes(dtype), kernels=kernels, dtype=act_dtype(dtype))


def allreduce(name: str, sc: Scenario, shape: ModelShape, dtype: str, tp: int) -> list[Op]:
    """The all-reduce of a (B, T, H) partial sum; nothing when there is one rank."""
    if tp == 1:
        return []
    return [Op(name, kernels=0, allreduce_bytes=float(sc.tokens * shape.hidden_size * act_bytes(dtype)))]


def _norm_and_residual(tag: str, sc: Scenario, shape: ModelShape, dtype: str) -> list[Op]:
    x = sc.tokens * shape.hidden_size  # (B, T, H)
    return [elementwise(f"{tag}.norm", x, dtype, kernels=NORM_KERNELS),
            elementwise(f"{tag}.residual", x, dtype, kernels=RESIDUAL_KERNELS, passes=3.0)]


def attention_ops(shape: ModelShape, cfg: AttentionConfig, sc: Scenario, *, dtype: str, tp: int = 1) -> list[Op]:
    """Ops of one attention sub-block on the most loaded rank."""
    if cfg.kind == "no_op":
        return []
    H, BT, a = shape.hidden_size, sc.tokens, act_bytes(dtype)
    ops = _norm_and_residual("attn", sc, shape, dtype)
    if cfg.kind == "linear":
        ops.append(gemm("attn.linear", BT, H, split(H, tp), dtype))
        return ops + allreduce("attn.allreduce", sc, shape, dtype, tp)
    nh, nkv, hd = split(shape.num_attention_heads, tp), split(cfg.num_key_value_heads, tp), shape.head_dim
    ops.append(gemm("attn.q", BT, H, nh * hd, dtype))
    ops.append(gemm("attn.k", BT, H, nkv * hd, dtype))
    ops.append(gemm("attn.v", BT, H, nkv * hd, dtype))
    ops.append(elementwise("attn.rope", BT * (nh + nkv) * hd, dtype, kernels=ROPE_KERNELS, passes=4.0))
    keys = (sc.new_tokens + 1) / 2 if sc.phase == "prefill" else sc.attended  # mean keys per query
    kv_elems = sc.batch * sc.attended * nkv * hd  # (B, nkv, S, hd), each of K and V
    ops.append(Op("attn.kv_write", bytes=2.0 * BT * nkv * hd * a, kernels=2 if sc.phase == "decode" else 0,
                  dtype=act_dtype(dtype)))
    ops.append(Op("attn.sdpa", flops=4.0 * BT * nh * hd * keys,  # QK^T and PV, 2 FLOPs per MAC
                  bytes=a * (2.0 * BT * nh * hd + 2.0 * kv_elems), dtype=act_dtype(dtype)))
    ops.append(elementwise("attn.reshape", BT * nh * hd, dtype, kernels=1))
    ops.append(gemm("attn.o", BT, nh * hd, H, dtype))
    return ops + allreduce("attn.allreduce", sc, shape, dtype, tp)


def ffn_ops(shape: ModelShape, cfg: FFNConfig, sc: Scenario, *, dtype: str, tp: int = 1) -> list[Op]:
    """Ops of one FFN sub-block on the most loaded rank."""
    if cfg.kind == "no_op":
        return []
    H, BT = shape.hidden_size, sc.tokens
    ops = _norm_and_residual("ffn", sc, shape, dtype)
    if cfg.kind == "linear":
        ops.append(gemm("ffn.linear", BT, H, split(H, tp), dtype))
        return ops + allreduce("ffn.allreduce", sc, shape, dtype, tp)
    m = split(cfg.intermediate_size, tp)
    ops.append(gemm("ffn.gate", BT, H, m, dtype))
    ops.append(gemm("ffn.up", BT, H, m, dtype))
    ops.append(elementwise("ffn.silu_mul", BT * m, dtype, kernels=2, passes=3.5))  # silu(g) * u
    ops.append(gemm("ffn.down", BT, m, H, dtype))
    return ops + allreduce("ffn.allreduce", sc, shape, dtype, tp)


def block_ops(shape: ModelShape, block: BlockConfig, sc: Scenario, *, dtype: str, tp: int = 1) -> list[Op]:
    return (attention_ops(shape, block.attention, sc, dtype=dtype, tp=tp)
            + ffn_ops(shape, block.ffn, sc, dtype=dtype, tp=tp))


def fixed_ops(shape: ModelShape, sc: Scenario, *, dtype: str, tp: int = 1) -> list[Op]:
    """Embedding lookup, final norm and LM head (vocab-parallel; logits of the last token only)."""
    H, V = shape.hidden_size, split(shape.vocab_size, tp)
    rows = sc.batch  # a serving step needs next-token logits of the last position only
    ops = [elementwise("embed", sc.tokens * H, dtype, kernels=1),
           elementwise("final_norm", rows * H, dtype, kernels=NORM_KERNELS),
           gemm("lm_head", rows, H, V, dtype)]
    if tp > 1:  # vocab-parallel embedding sums its partial lookups; the head gathers its logits
        ops += allreduce("embed.allreduce", sc, shape, dtype, tp)
        # A ring all-gather of the full (rows, tp * V) logits moves half what an all-reduce of them does.
        ops.append(Op("lm_head.gather", kernels=0, allreduce_bytes=float(rows * tp * V * act_bytes(dtype)) / 2))
    return ops


# --------------------------------------------------------------------------- sizes and memory


def block_params(shape: ModelShape, block: BlockConfig) -> int:
    """Parameters of a block (whole layer, not per rank), norms included: :mod:`puzzle.summary`'s counts."""
    return attention_params(block.attention, shape) + ffn_params(block.ffn, shape)


def block_weight_bytes(shape: ModelShape, block: BlockConfig, *, dtype: str, tp: int = 1) -> float:
    """Weight bytes on the most loaded rank (norms replicated, in the activation dtype)."""
    H, hd, w, a = shape.hidden_size, shape.head_dim, DTYPE_BYTES[dtype], act_bytes(dtype)
    total = 0.0
    att, ffn = block.attention, block.ffn
    if att.kind == "linear":
        total += w * H * split(H, tp) + a * H
    elif att.kind == "gqa":
        nh, nkv = split(shape.num_attention_heads, tp), split(att.num_key_value_heads, tp)
        total += w * (H * (nh + 2 * nkv) * hd + nh * hd * H) + a * H
    if ffn.kind == "linear":
        total += w * H * split(H, tp) + a * H
    elif ffn.kind == "swiglu":
        total += w * 3 * H * split(ffn.intermediate_size, tp) + a * H
    return total


def kv_bytes_per_token(shape: ModelShape, block: BlockConfig, *, dtype: str, tp: int = 1) -> float:
    """KV-cache bytes per token of context per sequence, on the most loaded rank."""
    att = block.attention
    if att.kind != "gqa":
        return 0.0
    return 2.0 * split(att.num_key_value_heads, tp) * shape.head_dim * act_bytes(dtype)


def fixed_params(shape: ModelShape) -> int:
    """Embedding, final norm and (if untied) LM head."""
    V, H = shape.vocab_size, shape.hidden_size
    return V * H * (1 if shape.tie_word_embeddings else 2) + H


def fixed_weight_bytes(shape: ModelShape, *, dtype: str, tp: int = 1) -> float:
    """Embedding (kept in the activation dtype), final norm and LM head (GEMM dtype), per rank.

    A tied head shares the embedding's storage: counted once, in the activation dtype.
    """
    V, H, a = split(shape.vocab_size, tp), shape.hidden_size, act_bytes(dtype)
    head = 0 if shape.tie_word_embeddings else DTYPE_BYTES[dtype] * V * H
    return a * V * H + head + a * H
