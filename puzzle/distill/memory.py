"""Memory of one process of sharded GKD, in closed form (for the resource plan; no torch here).

With ``world`` processes, FSDP2 (:mod:`puzzle.distill.sharding`) and ``b = micro_batch`` sequences of
``T = seq_len`` tokens per forward pass of a process, a process holds

* its shard of the student: of a trained weight its fp32 value, gradient and two AdamW moments,
  ``16 * trained / world`` (``block_library.memory.TRAIN_BYTES_PER_PARAM``); of a frozen one
  (``GKDConfig.train``, :mod:`puzzle.distill.trainable`) its fp32 value alone, ``4 * frozen / world``;
* its shard of the parent, forward only: ``dtype_bytes * parent_params / world`` (none when every target
  is cached, ``teacher=False``: no process loads the parent);
* the units of weights running now, whole (:func:`gathered_bytes`): ``16 * largest_unit_params`` when every
  weight trains (in the student's backward a unit's fp32 weights, their fp32 gradient, the reduce-scatter's
  copy of it, and the next unit's weights prefetched), less where weights are frozen;
* the activations of one forward pass, ``b * T`` tokens:

  - the student's autograd graph, ``ACT_BYTES_PER_HIDDEN * hidden`` per token and layer; with
    activation checkpointing only each layer's input (``4 * hidden``) plus one layer's graph while it
    is recomputed in the backward;
  - the parent's hidden states (all of them are returned), ``dtype_bytes * hidden * (layers + 1)``, or
    with cached targets the cached last one (``4 * hidden``);
  - the logits and what the KL makes of them, ``LOGIT_BYTES * vocab`` per token (``CACHED_LOGIT_BYTES``
    with cached targets: no parent logits).

The units and the logits' buffers are not alive together: the logits, the KL's buffers and their gradients come
first in the backward, beside the LM head's weights and the last layer's prefetched (:func:`loss_units_bytes`);
a unit's gradient and the reduce-scatter's copy come after. So, every weight trained and a live teacher::

    bytes = 16 * C / world + d * P / world + b * T * G
            + max(b * T * (d * H * (L + 1) + LOGIT_BYTES * V) + 4 * (V * H + U_layer), 16 * U)
    G = A * H * L                  no checkpointing
    G = 4 * H * L + A * H          with checkpointing

(``A = ACT_BYTES_PER_HIDDEN``). Not counted: the process itself (``block_library.memory.PROCESS_BYTES``,
on a GPU also a CUDA context), the models handed to ``distill_child`` (kept by the caller, on the CPU when
the child is larger than one device), and host memory at the edges of the run: rank 0 gathers weights
and moments whole (12 bytes per child parameter) to write a checkpoint, and every process gathers the
trained child (4 bytes per parameter) to return it. On a GPU, bf16 autocast makes the activation terms
smaller than these fp32 counts; the formula stays an upper bound there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from block_library.memory import TRAIN_BYTES_PER_PARAM

ACT_BYTES_PER_HIDDEN = 80
"""Bytes one token's autograd graph of one decoder layer keeps per hidden unit in fp32: the residual and
normed inputs, q/k/v and the attention output, the SwiGLU gate, up and product (about 2.7 hidden wide
each), about 20 floats."""
LOGIT_BYTES = 32
"""Bytes per token and vocabulary entry: parent and child logits and log-probabilities, the KL's
intermediates and the logits' gradient (fp32)."""
CACHED_LOGIT_BYTES = 24
"""The same against cached targets: the child's logits and log-probabilities, the copy whose entries outside the
parent's top k the coarsened KL sums (kept for the backward), and the gradients flowing back through them."""
UNIT_BYTES_PER_PARAM = 16
"""A unit's whole fp32 weights, gradient and the reduce-scatter's copy of it in the backward, and the next
unit's weights prefetched."""
FROZEN_BYTES_PER_PARAM = 4
"""A frozen student weight: its fp32 value; no gradient, no AdamW moments."""
FROZEN_UNIT_BYTES_PER_PARAM = 8
"""A frozen weight of a unit running now: its fp32 value gathered (the backward gathers it again, to carry the
gradient through to the units before it) and the next unit's prefetched; no gradient to reduce."""


def loss_units_bytes(layers: Sequence[tuple[int, int]], edges: tuple[int, int], *, vocab_hidden: int, tied: bool,
                     units: float) -> float:
    """Bytes FSDP2 holds whole while the logits and the KL's buffers are alive (the peak of a step's memory), for a
    student whose decoder layers and edges (the embedding, the LM head and the final norm) hold ``(trained, frozen)``
    parameters each; ``units`` is :func:`gathered_bytes`. A frozen tied embedding sits in the root unit, gathered
    from the forward's start to the backward's end beside the layer running: ``units`` itself. Otherwise the LM
    head's weights and the last layer's, prefetched for its backward, fp32 (``FROZEN_BYTES_PER_PARAM``): the head's
    gradient, the reduce-scatter's copy and the next units come after the logits' gradient is freed. Measured on a
    4-layer, hidden-512, 49k-vocabulary shape under 2-process torchrun, every weight trained, 1024-token sequences:
    each sequence added 1.24 GiB (the plan's per-token terms 1.28) and a step's peak without sequences was the shards
    and the process alone (``benchmarks/scale.py --quick``)."""
    _, frozen = edges
    if frozen and tied:
        return float(units)
    return float(FROZEN_BYTES_PER_PARAM * (vocab_hidden + max((t + f for t, f in layers), default=0)))


def gathered_bytes(layers: Sequence[tuple[int, int]], edges: tuple[int, int], *, vocab_hidden: int,
                   tied: bool) -> float:
    """Bytes of the units FSDP2 holds whole at once, for a student whose decoder layers and edges (the embedding,
    the LM head and the final norm) hold ``(trained, frozen)`` parameters each (a
    :class:`puzzle.distill.trainable.ParamSplit`); ``vocab_hidden`` = V x H, one embedding matrix.

    A layer in its backward costs 16 bytes per trained and 8 per frozen parameter. A trained embedding / head is
    counted as before (16 bytes a parameter of the larger of it and the largest layer). A frozen one: tied, it sits
    with the final norm in the root unit, which FSDP2 gathers when the forward starts and frees only when the
    backward ends, beside the layer running; untied, the embedding and the head are units of their own."""
    layer = max((UNIT_BYTES_PER_PARAM * t + FROZEN_UNIT_BYTES_PER_PARAM * f for t, f in layers), default=0)
    trained, frozen = edges
    if not frozen:
        largest = max([t + f for t, f in layers] + [vocab_hidden])
        return float(UNIT_BYTES_PER_PARAM * largest)
    if tied:
        return float(FROZEN_BYTES_PER_PARAM * frozen + UNIT_BYTES_PER_PARAM * trained + layer)
    return float(max(FROZEN_UNIT_BYTES_PER_PARAM * vocab_hidden, layer))


def gkd_rank_bytes(child_params: int, parent_params: int, *, largest_unit_params: int = 0, world: int,
                   micro_batch: int, seq_len: int, hidden: int, layers: int, vocab: int,
                   checkpointing: bool = False, dtype_bytes: int = 4, frozen_params: int = 0,
                   unit_bytes: float | None = None, teacher: bool = True,
                   loss_unit_bytes: float | None = None) -> float:
    """Peak bytes one of ``world`` processes of sharded GKD holds (see the module docstring for each term).

    ``largest_unit_params``: parameters of the largest unit FSDP gathers at once (the largest decoder layer,
    or the embedding or LM head, or both together when tied), every weight trained; or ``unit_bytes``, what
    :func:`gathered_bytes` counts. ``micro_batch``: sequences per forward pass of one process
    (``GKDConfig.micro_batch``, or ``batch / world`` when 0). ``layers``: the larger depth of child and parent.
    ``dtype_bytes``: bytes per parent weight and activation (2 for bf16). ``frozen_params``: of ``child_params``,
    those that do not train. ``teacher`` False: every target of training and validation is cached (the parent is
    not loaded; its term and its activations drop, the cached last hidden state and logits' share stay).
    ``loss_unit_bytes``: what FSDP2 holds whole while the logits and their gradient are alive
    (:func:`loss_units_bytes`); None counts ``unit_bytes`` there too (the two phases summed, an upper bound).
    """
    if world < 1 or micro_batch < 1 or seq_len < 1:
        raise ValueError(f"world, micro_batch and seq_len must be >= 1, got {world}, {micro_batch}, {seq_len}")
    if not 0 <= frozen_params <= child_params:
        raise ValueError(f"frozen_params must be between 0 and child_params {child_params}, got {frozen_params}")
    student = TRAIN_BYTES_PER_PARAM * (child_params - frozen_params) + FROZEN_BYTES_PER_PARAM * frozen_params
    shards = (student + (dtype_bytes * parent_params if teacher else 0)) / world
    units = UNIT_BYTES_PER_PARAM * largest_unit_params if unit_bytes is None else unit_bytes
    at_loss = units if loss_unit_bytes is None else loss_unit_bytes
    if world == 1:  # no FSDP: nothing gathered, its gradients are in the student's 16 B a parameter (measured on
        units = at_loss = 0.0  # SmolLM2's one-process GKD at 1024 tokens: 5.15 GiB, the plan 6.05 without a unit)
    graph = (4 * hidden * layers + ACT_BYTES_PER_HIDDEN * hidden) if checkpointing \
        else ACT_BYTES_PER_HIDDEN * hidden * layers
    targets = (dtype_bytes * hidden * (layers + 1) + LOGIT_BYTES * vocab if teacher  # the parent's, live
               else 4 * hidden + CACHED_LOGIT_BYTES * vocab)
    tokens = micro_batch * seq_len
    # the logits' phase (the units it holds beside them) and the layers' backward (the largest unit, after the
    # logits and their gradient are freed); the graph of the layers lives through both
    return float(shards + tokens * graph + max(tokens * targets + at_loss, units))


def teacher_pass_bytes(config: Any, world: int, *, seq_len: int, dtype_bytes: int, chunk: int = 2) -> list[float]:
    """Peak bytes of each of ``world`` ranks computing the parent's cached targets layer-sharded
    (:func:`puzzle.distill.teacher_sharded.sharded_targets`, before GKD's training under torchrun): its layers of
    the parent in the compute dtype (rank 0 the embedding, the last rank the final norm and LM head), a chunk of
    sequences through them, and on the last rank the chunk's (b, T-1, V) float32 log-probs, about three copies
    while the top k and the rest outside them are taken. Ranks past the parent's depth hold nothing. Not counted:
    the process itself."""
    from block_library.distributed import split_layers
    from puzzle.evaluation.memory import chunk_activation_bytes, layer_params, model_part_params

    ranges = split_layers([float(p) for p in layer_params(config)], min(world, config.num_hidden_layers))
    out = []
    for r, layers in enumerate(ranges):
        first, last = r == 0, r == len(ranges) - 1
        weights = model_part_params(config, layers, first=first, last=last) * dtype_bytes
        work = chunk_activation_bytes(config, layers, chunk=chunk, seq_len=seq_len, dtype_bytes=dtype_bytes)
        logprobs = 3 * chunk * (seq_len - 1) * config.vocab_size * 4 if last else 0
        out.append(float(weights + max(work, logprobs)))
    return out + [0.0] * (world - len(ranges))
