"""Memory of one rank of the layer-sharded evaluation (:mod:`puzzle.evaluation.sharded`), in closed form.

    parent_ranges = split_layers(layer_params(parent), world)     # as evaluate_sharded splits each model
    child_ranges = split_layers(layer_params(child), world)
    evaluate_rank_bytes(parent, child, parent_ranges[r], child_ranges[r], first=r == 0, last=r == world - 1,
                        chunk=2, seq_len=256, num_sequences=8, dtype_bytes=4)

A rank holds the process itself (:data:`~block_library.memory.PROCESS_BYTES`; on a GPU the CUDA
context) and, one model at a time (the parent's phase, then the child's):

* its layers of that model in the compute dtype; rank 0 the embedding; the last rank the final
  norm and LM head (a tied head is the embedding, read for it);
* the largest of: loading (the file pages of the tensor being read, mapped while it is copied: the
  copy is one of the weights), a chunk (b, T) through its layers (residual stream, RoPE tables,
  one layer's internals; causal SDPA runs a flash kernel on the CPU too, with no (b, heads, T, T) scores) and,
  on the last rank in the child's phase, scoring ``logit_positions`` positions: five (n, V)
  float32 buffers (both log-probs; exp p, p - q and their product inside the KL);
* on the last rank, from the parent's phase on: the parent's final hidden states (N, T, H) (kept
  in host memory on a GPU), and in the child's phase the parent's LM head.

Config objects are :class:`~puzzle.model.PuzzleConfig` (``blocks``, sizes). No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from block_library.memory import CUDA_CONTEXT_BYTES, PROCESS_BYTES
from puzzle.summary import attention_params, ffn_params

LOGPROB_BUFFERS = 5
"""(n, V) float32 buffers alive at once while a block of positions is scored: p, q, exp(p), p - q, product."""


def layer_params(config: Any) -> list[int]:
    """Parameters of each decoder layer (norms included)."""
    return [attention_params(b.attention, config) + ffn_params(b.ffn, config) for b in config.blocks]


def largest_tensor_params(config: Any) -> int:
    """Elements of the largest weight: the embedding / head, or a layer's widest projection."""
    H = config.hidden_size
    widest = [config.vocab_size * H]
    for b in config.blocks:
        if b.ffn.kind == "swiglu":
            widest.append(b.ffn.intermediate_size * H)
        elif b.ffn.kind == "linear":
            widest.append(H * H)
        if b.attention.kind == "gqa":
            widest.append(config.num_attention_heads * config.head_dim * H)
        elif b.attention.kind == "linear":
            widest.append(H * H)
    return max(widest)


def model_part_params(config: Any, layers: Sequence[int], *, first: bool, last: bool) -> int:
    """Parameters one rank reads of one model: its layers, the embedding on the first rank, the final
    norm and the head on the last (a tied head is the embedding: read once when one rank is both)."""
    V, H = config.vocab_size, config.hidden_size
    sizes = layer_params(config)
    params = sum(sizes[l] for l in layers) + (V * H if first else 0)
    if last:
        params += H + (0 if first and config.tie_word_embeddings else V * H)
    return params


def chunk_activation_bytes(config: Any, layers: Sequence[int], *, chunk: int, seq_len: int, dtype_bytes: int) -> float:
    """Peak activations of one chunk (b, T) through the rank's layers of one model."""
    if not layers:
        return 0.0
    b, T, H = chunk, seq_len, config.hidden_size
    heads, hd = config.num_attention_heads, config.head_dim
    streams = 4 * b * T * H + 2 * b * T * hd  # x, the block's output, a norm, a received buffer; RoPE cos, sin
    widths = [config.blocks[l].ffn.intermediate_size for l in layers if config.blocks[l].ffn.kind == "swiglu"]
    ffn = 4 * b * T * max(widths, default=H)  # gate, up, silu(gate), product
    attention = 4 * b * T * heads * hd  # q, k, v, output: causal SDPA runs a flash kernel, no (b, nh, T, T) scores
    return float((streams + max(ffn, attention)) * dtype_bytes)


def scoring_bytes(vocab_size: int, *, chunk: int, seq_len: int, logit_positions: int) -> float:
    """The last rank's log-prob buffers while a block of positions is scored."""
    n = min(logit_positions, chunk * (seq_len - 1))
    return float(LOGPROB_BUFFERS * n * vocab_size * 4)


def _in_flight_params(config: Any, *, last: bool) -> int:
    """Elements of the stored tensor mapped while it is copied, at the moment the most is already held:
    ``load_layers`` reads the embedding first (nothing else resident yet), so the peak comes with a
    layer's widest projection, or with an untied LM head, read last."""
    H = config.hidden_size
    widest = [H * H]
    for b in config.blocks:
        if b.ffn.kind == "swiglu":
            widest.append(b.ffn.intermediate_size * H)
        if b.attention.kind == "gqa":
            widest.append(config.num_attention_heads * config.head_dim * H)
    head = config.vocab_size * H if last and not config.tie_word_embeddings else 0
    return max(max(widest), head)


def evaluate_rank_bytes(parent: Any | None, child: Any, parent_layers: Sequence[int], child_layers: Sequence[int], *,
                        first: bool, last: bool, chunk: int, seq_len: int, num_sequences: int, dtype_bytes: int,
                        logit_positions: int = 256, stored_bytes: int = 4, device: str = "cpu") -> float:
    """Peak bytes of one rank of :func:`~puzzle.evaluation.sharded.evaluate_sharded` on its device
    (on CPU the process itself included). ``parent=None``: the child alone (or compared with itself).
    ``stored_bytes``: bytes per element of the checkpoints on disk."""
    cpu = device == "cpu"

    def phase(config: Any, layers: Sequence[int], *, scoring: bool) -> float:
        weights = model_part_params(config, layers, first=first, last=last) * dtype_bytes
        loading = _in_flight_params(config, last=last) * stored_bytes if cpu else 0  # on a GPU, host memory
        work = chunk_activation_bytes(config, layers, chunk=chunk, seq_len=seq_len, dtype_bytes=dtype_bytes)
        if scoring:
            work = max(work, scoring_bytes(child.vocab_size, chunk=chunk, seq_len=seq_len,
                                           logit_positions=logit_positions))
        return weights + max(loading, work)

    child_phase = phase(child, child_layers, scoring=last)
    parent_phase = 0.0
    if parent is not None:
        parent_phase = phase(parent, parent_layers, scoring=False)
        if last:
            states = num_sequences * seq_len * parent.hidden_size * dtype_bytes
            states = states if cpu else chunk * seq_len * parent.hidden_size * dtype_bytes  # one chunk on the device
            parent_phase += states
            child_phase += states + parent.vocab_size * parent.hidden_size * dtype_bytes  # + the parent's LM head
    base = PROCESS_BYTES if cpu else CUDA_CONTEXT_BYTES
    return float(base + max(parent_phase, child_phase))
