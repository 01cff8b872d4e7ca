"""Memory of the layer-sharded fusion (:mod:`puzzle.fusion.sharded`) on one rank, in closed form.

    costs = fuse_layer_costs(child_config)                        # what the ranks balance
    ranges = split_layers(costs, world)                           # block_library.distributed
    parent_ranges = split_layers(fuse_layer_costs(parent_config), world)
    fuse_rank_bytes(child_config, ranges[r], first=r == 0, last=r == world - 1,
                    calib_sequences=8, eval_sequences=8, seq_len=256,
                    parent=parent_config, parent_layers=parent_ranges[r], distill=True)

A rank first runs its share of the parent (phase 1: the parent's reference log-probs), frees it,
then loads its share of the child (phase 2); its peak is the larger of the two phases. It holds,
with ``b`` the compute dtype's bytes per value (float32 by default: 4):

* the process itself (:data:`block_library.memory.PROCESS_BYTES`; on a GPU the CUDA context);
* phase 1: its parent layers, on the first rank the embedding, on the last the final norm and
  head, ``b`` bytes per parameter, and the activations of one ``chunk`` of held-out sequences;
* phase 2: its child layers likewise, and
  - the calibration pass: the activations of all ``calib_sequences`` through one layer, and the
    residual stream entering each of its runs, (N, T, H) per run start, kept to the end;
  - one fused block at a time (the widest its runs allow) with the float64 temporaries of its
    folding (two copies of one projection, 8 bytes per value);
  - with distillation: the inputs and the sequential outputs of every segment it may fuse, and, one
    block at a time, the widest fused block's training state
    (:data:`block_library.memory.TRAIN_BYTES_PER_PARAM` per parameter) with its activations (the
    kept fused blocks themselves replace their members: no extra weights);
* on the last rank: the unfused child's log-probs (N_eval, T-1, V) float32, the parent's as many
  (kept from phase 1), and the head's temporaries of one chunk (about 5 x (chunk, T, V) float32).

No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from block_library.memory import CUDA_CONTEXT_BYTES, PROCESS_BYTES, TRAIN_BYTES_PER_PARAM, embedding_params
from puzzle.fusion.runs import Segment, find_runs, fused_width, split_at_ranks
from puzzle.summary import attention_params, ffn_params

LOGPROB_BYTES = 4
"""Log-probs are float32 whatever the compute dtype."""
HEAD_TEMPORARIES = 5
"""(chunk, T, V) float32 tensors alive while one chunk goes through the head and the metrics."""
EVAL_CHUNK = 2
"""Held-out sequences per pipelined chunk (as :func:`puzzle.fusion.evaluate.reference_logprobs`)."""


def fuse_layer_costs(config: Any) -> list[float]:
    """What the ranks balance per layer: its parameters (attention and FFN, their norms included)."""
    return [float(attention_params(b.attention, config) + ffn_params(b.ffn, config)) for b in config.blocks]


def rank_runs(config: Any, layers: range) -> list[Segment]:
    """The runs a rank owning ``layers`` analyzes: the attention-free SwiGLU runs cut at its edges."""
    return [r for r in split_at_ranks(find_runs(config.blocks), [layers]) if r.start in layers]


def _weights_params(config: Any, layers: Sequence[int], *, first: bool, last: bool) -> int:
    """A rank's parameters: its layers, the embedding (first), the final norm and the head (last; a tied
    head is the embedding, read again unless the rank also holds it as the first)."""
    params = sum(attention_params(config.blocks[l].attention, config) + ffn_params(config.blocks[l].ffn, config)
                 for l in layers)
    if first:
        params += embedding_params(config)
    if last:
        params += config.hidden_size + (0 if config.tie_word_embeddings and first else embedding_params(config))
    return params


def _pass_bytes(config: Any, layers: Sequence[int], *, sequences: int, seq_len: int, dtype_bytes: int) -> float:
    """One pass of ``sequences`` through the rank's widest layer: streams in and out, the normed input,
    the FFN's gate, up and product, or the attention's q, k, v and output."""
    if not layers:
        return 0.0
    H, BT = config.hidden_size, sequences * seq_len
    heads, hd = config.num_attention_heads, config.head_dim
    widest = max((config.blocks[l].ffn.intermediate_size for l in layers if config.blocks[l].ffn.kind == "swiglu"),
                 default=H)
    attention = any(config.blocks[l].attention.kind != "no_op" for l in layers)
    inner = max(3 * BT * widest, 4 * BT * heads * hd if attention else 0)  # causal SDPA: flash, no (B, nh, T, T)
    return float((4 * BT * H + 2 * BT * hd + inner) * dtype_bytes)


def fuse_rank_bytes(config: Any, layers: range, *, first: bool, last: bool, calib_sequences: int,
                    eval_sequences: int, seq_len: int, parent: Any | None = None, parent_layers: Sequence[int] = (),
                    distill: bool = False, max_width_mult: float | None = 8.0, dtype_bytes: int = 4,
                    device: str = "cpu") -> float:
    """Peak bytes of one rank of the sharded fusion owning the child's ``layers`` (and ``parent_layers``
    of ``parent``'s, when the run reports KL to the parent); see the module docstring."""
    H, V, T = config.hidden_size, config.vocab_size, seq_len
    Nc, Ne = calib_sequences, eval_sequences
    chunk = min(EVAL_CHUNK, Ne)
    base = PROCESS_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES
    logprobs = Ne * (T - 1) * V * LOGPROB_BYTES  # one set of reference log-probs
    head = HEAD_TEMPORARIES * chunk * T * V * LOGPROB_BYTES if last else 0
    # Phase 1: the parent's share and one chunk through it; the last rank gathers the parent's log-probs.
    phase1 = 0.0
    if parent is not None:
        phase1 = (_weights_params(parent, parent_layers, first=first, last=last) * dtype_bytes
                  + _pass_bytes(parent, parent_layers, sequences=chunk, seq_len=T, dtype_bytes=dtype_bytes)
                  + (logprobs + head if last else 0))
    # Phase 2: the child's share, its cached run inputs, the reference log-probs on the last rank.
    runs = rank_runs(config, layers)
    stream = Nc * T * H * dtype_bytes  # (N, T, H): one cached run input
    held = (_weights_params(config, layers, first=first, last=last) * dtype_bytes + len(runs) * stream
            + ((2 if parent is not None else 1) * logprobs if last else 0))
    calib = _pass_bytes(config, layers, sequences=Nc, seq_len=T, dtype_bytes=dtype_bytes)
    # One fused block (its weights, and the float64 folding of one projection: members and concatenation).
    cap = None if max_width_mult is None else int(max_width_mult * config.intermediate_size)
    widths = [fused_width(config.blocks, r) for r in runs]
    widest = max((w if cap is None else min(w, cap) for w in widths), default=0)
    block = (3 * H * widest + H) * dtype_bytes if widest else 0
    fold = 2 * H * widest * 8
    evaluate = block + fold + _pass_bytes(config, layers, sequences=chunk, seq_len=T, dtype_bytes=dtype_bytes) + head
    # Dependencies: a run of n layers, 4 sequences at a time, keeps x_k and f_k of each of its layers.
    b4 = min(4, Nc)
    dependency = max(((2 * len(r) * b4 * T * H + 3 * b4 * T * max(config.blocks[l].ffn.intermediate_size
                                                                   for l in r.layers)) * dtype_bytes for r in runs),
                     default=0)
    train = pairs = 0.0
    if distill and widest:
        # the kept blocks replace their members; each segment's input and sequential output stay until the
        # end of distillation; one block trains at a time: its state and the autograd graph of a batch of 2
        # (streams in and out, normed input; gate, up, silu and product)
        pairs = 2 * sum(len(r) // 2 for r in runs) * stream  # at most len // 2 segments per run
        train = (3 * H * widest + H) * TRAIN_BYTES_PER_PARAM + 2 * (3 * 2 * T * H + 4 * 2 * T * widest) * 4
    phase2 = held + pairs + max(calib, evaluate, dependency, train)
    return float(base + max(phase1, phase2))
