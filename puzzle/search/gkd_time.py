"""GKD's predicted time (:class:`~puzzle.search.stages.gkd.GKDStage`'s seconds), on the stage clock.

Every step runs on a rank's share of the batch (FSDP2 splits it): the student's forward with the head and the
loss over the vocabulary, its backward (twice the forward for the layers whose weights train; once, the
activations' gradient alone, for frozen layers after the first trained one; none before it), the forward again
with activation checkpointing, AdamW over the rank's shard of the trained weights, and under torchrun FSDP's
gathers and reduce-scatters. The live parent's forward runs in every step, or, cached, once before the steps
(layer-sharded under torchrun: split over the ranks). A validation every ``val_every`` steps and before the
first runs the child (and the live parent, unless its targets are cached); a checkpoint every
``checkpoint_every`` steps writes the weights and the moments.
"""

from __future__ import annotations

from typing import Any

from puzzle.search.cluster import DISK_BYTES_PER_S, Cluster
from puzzle.search.resources import Shapes

__all__ = ["gkd_seconds", "fsdp_seconds"]

FSDP_BYTES_PER_S = {"cpu": 0.2e9, "gpu": 2.0e10}
"""What one FSDP2 rank gathers (and reduce-scatters) per second: gloo between processes of one CPU machine (the
1.24 B proof's GKD steps, 41 s each on 2 ranks against 16 s of kernels), NCCL over NVLink (half its peak)."""


def fsdp_seconds(params: float, trained: float, world: int, *, checkpointing: bool, cpu: bool) -> float:
    """A step's FSDP2 traffic on one rank: every unit's fp32 weights gathered for the forward, again for the backward
    (the units reshard after their forward) and once more to recompute them with activation checkpointing, and the
    trained weights' gradients reduce-scattered; each rank receives ``(world - 1) / world`` of them."""
    if world <= 1:
        return 0.0
    moved = ((2 + checkpointing) * 4.0 * params + 4.0 * trained) * (world - 1) / world
    return moved / FSDP_BYTES_PER_S["cpu" if cpu else "gpu"]


def gkd_seconds(s: Any, cluster: Cluster, shapes: Shapes, *, checkpointing: bool, split: Any,
                cached: bool) -> float:
    """Seconds of the GKD stage on every rank. ``s``: its :class:`~puzzle.search.stages.gkd.GKDSettings`;
    ``split``: the child's trained and frozen parameters (:func:`puzzle.distill.trainable.param_split`);
    ``cached``: under torchrun, the parent's validation targets are cached too (no live parent)."""
    from puzzle.distill import GKDConfig
    from puzzle.search.timing import (KAPPA, VOCAB_LOGSOFTMAX, VOCAB_LOSS, VOCAB_METRIC, VOCAB_TOPK, batches,
                                      rank_clock)

    clock, W, T, C = rank_clock(cluster, shapes.parent), cluster.count, s.quality_context, shapes.child_params
    child, parent = shapes.child_config, shapes.parent
    if clock.target is None:  # GPUs: the student's 6 (8 recomputing) and the parent's 2 FLOPs a parameter a token
        return s.gkd_steps * s.gkd_batch * T * ((8 if checkpointing else 6) * C + 2 * shapes.parent_params) / W \
            / clock.flops
    if len(child.blocks) != len(split.layers):  # a fused child planned with the parent's split: every layer trains
        split = None
    b = max(1, s.gkd_batch // W)
    rows = b * (T - 1)
    forward = [clock.block(blk, b, T) for blk in child.blocks]
    trained = [l for l, (n, _) in enumerate(split.layers) if n] if split is not None else list(range(len(forward)))
    first = min(trained, default=len(forward))
    backward = sum((KAPPA - 1) * f if l in trained else f for l, f in enumerate(forward) if l >= first)
    step = (sum(forward) * (2 if checkpointing else 1) + backward + KAPPA * clock.head(rows, VOCAB_LOSS)
            + clock.optimizer((split.trained if split is not None else C) / W)
            + fsdp_seconds(C, split.trained if split is not None else C, W, checkpointing=checkpointing,
                           cpu=cluster.is_cpu))
    teacher = clock.blocks(parent.blocks, b, T)
    once = 0.0
    if s.gkd_top_k:  # the parent's top-k targets of every step's sequences, computed once (layer-sharded: split)
        B = s.gkd_batch
        once = s.gkd_steps * (clock.blocks(parent.blocks, B, T) + clock.head(B * (T - 1), VOCAB_TOPK)) / W
    else:
        step += teacher + clock.head(rows, VOCAB_LOGSOFTMAX)
    cfg = GKDConfig()
    vb, vm = batches(-(-min(cfg.val_sequences, s.eval_sequences) // W), b)
    val = vm * (clock.blocks(child.blocks, vb, T) + clock.head(vb * (T - 1), VOCAB_METRIC)
                + (0.0 if cached else teacher * vb / b))
    checkpoints = max(0, (s.gkd_steps - 1) // cfg.checkpoint_every) * 12 * C / DISK_BYTES_PER_S
    return once + s.gkd_steps * step + (s.gkd_steps // cfg.val_every + 2) * val + checkpoints + 4 * C / DISK_BYTES_PER_S
