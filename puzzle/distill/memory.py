"""Memory of one process of sharded GKD, in closed form (for the resource plan; no torch here).

With ``world`` processes, FSDP2 (:mod:`puzzle.distill.sharding`) and ``b = micro_batch`` sequences of
``T = seq_len`` tokens per forward pass of a process, a process holds

* its shard of the student: fp32 weights, gradients and two AdamW moments,
  ``16 * child_params / world`` (``block_library.memory.TRAIN_BYTES_PER_PARAM``);
* its shard of the parent, forward only: ``dtype_bytes * parent_params / world``;
* the unit of weights running now, whole (a decoder layer, or the embedding / LM head, or both when
  tied): in the student's backward its fp32 weights, their fp32 gradient, the reduce-scatter's copy
  of it, and the next unit's weights prefetched, ``16 * largest_unit_params``;
* the activations of one forward pass, ``b * T`` tokens:

  - the student's autograd graph, ``ACT_BYTES_PER_HIDDEN * hidden`` per token and layer; with
    activation checkpointing only each layer's input (``4 * hidden``) plus one layer's graph while it
    is recomputed in the backward;
  - the parent's hidden states (all of them are returned), ``dtype_bytes * hidden * (layers + 1)``;
  - the logits and what the KL makes of them, ``LOGIT_BYTES * vocab`` per token.

So::

    bytes = 16 * C / world + d * P / world + 16 * U
            + b * T * (A * H * L + d * H * (L + 1) + LOGIT_BYTES * V)      no checkpointing
            + b * T * (4 * H * L + A * H + d * H * (L + 1) + LOGIT_BYTES * V)  with checkpointing

(``A = ACT_BYTES_PER_HIDDEN``). Not counted: the process itself (``block_library.memory.PROCESS_BYTES``,
on a GPU also a CUDA context), the models handed to ``distill_child`` (kept by the caller, on the CPU when
the child is larger than one device), and host memory at the edges of the run: rank 0 gathers weights
and moments whole (12 bytes per child parameter) to write a checkpoint, and every process gathers the
trained child (4 bytes per parameter) to return it. On a GPU, bf16 autocast makes the activation terms
smaller than these fp32 counts; the formula stays an upper bound there.
"""

from __future__ import annotations

from block_library.memory import TRAIN_BYTES_PER_PARAM

ACT_BYTES_PER_HIDDEN = 80
"""Bytes one token's autograd graph of one decoder layer keeps per hidden unit in fp32: the residual and
normed inputs, q/k/v and the attention output, the SwiGLU gate, up and product (about 2.7 hidden wide
each), about 20 floats."""
LOGIT_BYTES = 32
"""Bytes per token and vocabulary entry: parent and child logits and log-probabilities, the KL's
intermediates and the logits' gradient (fp32)."""
UNIT_BYTES_PER_PARAM = 16
"""A unit's whole fp32 weights, gradient and the reduce-scatter's copy of it in the backward, and the next
unit's weights prefetched."""


def gkd_rank_bytes(child_params: int, parent_params: int, *, largest_unit_params: int, world: int,
                   micro_batch: int, seq_len: int, hidden: int, layers: int, vocab: int,
                   checkpointing: bool = False, dtype_bytes: int = 4) -> float:
    """Peak bytes one of ``world`` processes of sharded GKD holds (see the module docstring for each term).

    ``largest_unit_params``: parameters of the largest unit FSDP gathers at once (the largest decoder layer,
    or the embedding or LM head, or both together when tied). ``micro_batch``: sequences per forward pass of
    one process (``GKDConfig.micro_batch``, or ``batch / world`` when 0). ``layers``: the larger depth of
    child and parent. ``dtype_bytes``: bytes per parent weight and activation (2 for bf16).
    """
    if world < 1 or micro_batch < 1 or seq_len < 1:
        raise ValueError(f"world, micro_batch and seq_len must be >= 1, got {world}, {micro_batch}, {seq_len}")
    shards = (TRAIN_BYTES_PER_PARAM * child_params + dtype_bytes * parent_params) / world
    units = UNIT_BYTES_PER_PARAM * largest_unit_params
    graph = (4 * hidden * layers + ACT_BYTES_PER_HIDDEN * hidden) if checkpointing \
        else ACT_BYTES_PER_HIDDEN * hidden * layers
    per_token = graph + dtype_bytes * hidden * (layers + 1) + LOGIT_BYTES * vocab
    return float(shards + units + micro_batch * seq_len * per_token)
