"""Memory of replace-1-block scoring on one rank, in closed form from the parent's config.

    sizes = layer_sizes(parent_config, space)                       # block_library.memory
    ranges = split_layers(score_layer_costs(parent_config), world)   # the layers each rank owns
    score_rank_bytes(parent_config, sizes, ranges[r], first=r == 0, last=r == world - 1,
                     sequences=8, seq_len=256)

A rank of a sharded scoring run (:mod:`puzzle.scoring.sharded`; one process holds every layer and
is both first and last) holds, all in float32 (scoring computes in float32),

* the process itself (:data:`block_library.memory.PROCESS_BYTES`; on a GPU the CUDA context);
* its parent layers, on the last the final norm and the LM head; the first rank's embedding: on a GPU
  copied whole to the device, on a CPU memory-mapped from the library's file, where a lookup makes resident
  what the kernel reads around the looked-up row (:data:`MMAP_READAROUND_BYTES` a token, at most the whole
  matrix: a few hundred random tokens make SmolLM2's resident);
* one layer's own parent halves and one other variant at a time (loaded as used);
* the parent pass's cache: the streams entering each of its layers and after each attention
  half, (N, T, H) twice per layer; on the last rank the parent's log-probs (N, T-1, V);
* the activations of one group of ``variant_batch`` replacements, (K*N, T, H) streams and one
  layer's internals, in exact pairs the attention outputs kept for every FFN of the layer, and on
  the last rank ``head_chunk`` sequences of logits with the metrics' temporaries (about 5 x
  (head_chunk, T, V)).

No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from block_library.memory import CUDA_CONTEXT_BYTES, PROCESS_BYTES, LayerSizes, activation_bytes, embedding_params
from puzzle.summary import attention_params, ffn_params

FLOAT_BYTES = 4
"""Scoring's compute dtype: float32 (parent, variants, cache, log-probs)."""
MMAP_READAROUND_BYTES = 1 << 20
"""Resident bytes one random row lookup adds to a memory-mapped matrix: the kernel reads around the faulting page
and maps what it read. Measured on a 96 MiB embedding (49,152 x 512 float32) read from the library's file on this
machine: 16 random tokens 27 MiB, 64 tokens 63 MiB, 256 tokens the whole matrix (1-1.7 MiB a lookup)."""
HEAD_TEMPORARIES = 5
"""(head_chunk, T, V) float32 tensors alive while one head chunk is scored: logits, the child's and the
parent's log-probs, exp(p) and the difference inside the KL."""


def score_layer_costs(config: Any) -> list[float]:
    """What the ranks of a sharded scoring run balance per layer: the parent layer's parameters."""
    return [float(attention_params(b.attention, config) + ffn_params(b.ffn, config)) for b in config.blocks]


def score_rank_bytes(config: Any, sizes: Sequence[LayerSizes], layers: Sequence[int], *, first: bool, last: bool,
                     sequences: int, seq_len: int, pairs: str = "additive", variant_batch: int = 1,
                     head_chunk: int = 2, dtype_bytes: int = FLOAT_BYTES, device: str = "cpu") -> float:
    """Peak bytes of one scoring rank owning ``layers`` (see the module docstring); ``dtype_bytes`` is the
    weights' and activations' bytes per value (scoring runs float32 today)."""
    H, V, N, T = config.hidden_size, config.vocab_size, sequences, seq_len
    base = PROCESS_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES
    # Parent weights: the rank's layers; the embedding (first), the final norm and the LM head (last).
    params = sum(sizes[l].parent_params for l in layers)
    # A head multiplies by all of the embedding, so the last rank holds it whole (tied: the same matrix).
    if last:
        params += H + embedding_params(config)
    # The first rank's embedding: copied to a GPU; on a CPU memory-mapped, resident around each looked-up token
    # (the parent pass looks up the N x T tokens once: the replacements reuse its cached streams).
    embedding = embedding_params(config) * dtype_bytes if first and not last else 0
    if device == "cpu":
        embedding = min(embedding, N * T * MMAP_READAROUND_BYTES)
    # The parent's own halves of one layer and one other variant at a time (scoring.replacements.LayerModules).
    variants = max((sizes[l].parent_params + max((v.params for v in sizes[l].trainable), default=0)
                    for l in layers), default=0)
    # The parent pass's cache: inputs and mid-layer streams (N, T, H) per layer; log-probs (N, T-1, V).
    stream = N * T * H * dtype_bytes
    cache = 2 * stream * len(layers) + (N * (T - 1) * V * FLOAT_BYTES if last else 0)
    # One group in flight: the K block outputs and their concatenation, one layer's internals on (K*N, T).
    K = variant_batch
    group = 2 * K * stream + activation_bytes(config, sizes, layers, batch=K * N, seq_len=T, dtype_bytes=dtype_bytes,
                                              training=False)
    if pairs == "exact":  # every attention variant's output, reused by each FFN variant of the layer
        group += max((sum(v.subblock == "attention" for v in sizes[l].trainable) for l in layers), default=0) * stream
    head = HEAD_TEMPORARIES * min(head_chunk, N) * T * V * FLOAT_BYTES if last else 0
    return float(base + params * dtype_bytes + embedding + variants * FLOAT_BYTES + cache + group + head)
