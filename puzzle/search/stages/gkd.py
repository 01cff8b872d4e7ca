"""``gkd``: global knowledge distillation of the whole child from the parent's next-token distribution
(:mod:`puzzle.distill.gkd`).

    run/gkd/child/                 the distilled child (runtime checkpoint)
    run/gkd/gkd/                   checkpoints, losses, validation before and after
    <shared>/teacher/gkd-topK.safetensors           the parent's top-k targets, computed once (``gkd_top_k``)
    <shared>/teacher/gkd-topK-sharded.safetensors   the same, computed layer-sharded under torchrun

In one process student and teacher are whole. Under torchrun FSDP2 shards them over the ranks; the
parent's top-k targets are computed once with its layers split over the ranks
(:func:`puzzle.distill.teacher_sharded.sharded_targets`) and every rank reads the whole file, so no
training step runs the parent (the sharded parent serves validation only). The two files differ by
their parent fingerprint: a loaded parent's weights (``model_fingerprint``, one process) or its stored
files (``files_fingerprint``: under torchrun no rank holds the whole parent, and the GKD run fingerprints
its stored parent so); side by side, a search that changes its number of ranks, or the one-process
baselines beside a sharded GKD, reuse their own file instead of replacing each other's. Activation
checkpointing and CPU offload are switched on when the plan says a rank needs them. The baselines get
the same distillation (:meth:`distill`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from block_library.memory import PROCESS_BYTES, TRAIN_BYTES_PER_PARAM, embedding_params
from puzzle.search.cluster import Cluster
from puzzle.search.context import StageContext, resume_or_restart
from puzzle.search.plan import Plan
from puzzle.search.resources import SEQ_LEN, RankUse, Shapes, StageUse, base_bytes, host_bytes, one_rank, stage_use
from puzzle.search.setting import Section
from puzzle.search.stages.base import Stage


@dataclass(frozen=True)
class GKDSettings(Section):
    gkd_steps: int
    gkd_batch: int
    gkd_top_k: int
    seed: int
    data: tuple[str, ...]
    eval_sequences: int
    """GKD's own validation (before and after) is a progress check: no larger than the final evaluation."""


def training_key(plan: Plan) -> dict[str, Any]:
    """What a model distilled by this stage depends on besides its inputs (the baselines' keys hold it too)."""
    s = GKDSettings.of(plan)
    return {"gkd": [s.gkd_steps, s.gkd_batch, s.seed, s.gkd_top_k]}


def memory_options(plan: Plan, cluster: Cluster, shapes: Shapes) -> tuple[bool, bool]:
    """``(activation_checkpointing, offload)``: the first of none, checkpointing, checkpointing and the student's
    fp32 state in host RAM (FSDP2's CPU offload, GPUs only) that fits a rank."""
    options = [(False, False), (True, False)] + ([(True, True)] if not cluster.is_cpu else [])
    for checkpointing, offload in options:
        if _rank_bytes(plan, cluster, shapes, checkpointing=checkpointing, offload=offload) <= cluster.memory_per_rank:
            return checkpointing, offload
    return options[-1]


def _rank_bytes(plan: Plan, cluster: Cluster, shapes: Shapes, *, checkpointing: bool, offload: bool) -> float:
    from puzzle.distill.memory import gkd_rank_bytes

    s, config, world = GKDSettings.of(plan), shapes.parent, cluster.count
    P, C = shapes.parent_params, shapes.child_params
    unit = max([x.parent_params for x in shapes.layers] + [embedding_params(config)])  # a layer, embedding or head
    device = gkd_rank_bytes(C, P, largest_unit_params=unit, world=world, micro_batch=max(1, s.gkd_batch // world),
                            seq_len=SEQ_LEN, hidden=config.hidden_size, layers=len(shapes.layers),
                            vocab=config.vocab_size, checkpointing=checkpointing, dtype_bytes=cluster.dtype_bytes)
    if world == 1:
        device += C * 4  # the child as loaded, beside its fp32 student copy
    elif cluster.is_cpu:  # one memory: the cached targets every rank holds count against it
        device += sharded_cache(plan, shapes, world)[0]
    if offload:  # the fp32 student shards, their gradients and moments move to host RAM
        device -= TRAIN_BYTES_PER_PARAM * C / world
    return base_bytes(cluster) + device


def sharded_cache(plan: Plan, shapes: Shapes, world: int) -> tuple[float, float]:
    """``(held, file)``: bytes of the parent's top-k targets a rank holds under torchrun (every rank reads the whole
    file; its token ids widened to int64 in memory) and of the file; ``(0, 0)`` when there is none (``gkd_top_k`` 0,
    or one process: :meth:`GKDStage.resources` counts that cache itself)."""
    from puzzle.distill.teacher_cache import bytes_per_token

    s = GKDSettings.of(plan)
    if world == 1 or not s.gkd_top_k:
        return 0.0, 0.0
    k, tokens = min(s.gkd_top_k, shapes.parent.vocab_size), s.gkd_steps * s.gkd_batch * SEQ_LEN
    file = tokens * bytes_per_token(k, shapes.parent.hidden_size)
    return float(file + tokens * 4 * k), float(file)


class GKDStage(Stage):
    name, order = "gkd", 80
    sections = (GKDSettings,)
    sharded = True

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        s = GKDSettings.of(plan)
        return {"fuse": upstream["fuse"], "steps": s.gkd_steps, "batch": s.gkd_batch, "seed": s.seed,
                "data": list(s.data), "top_k": s.gkd_top_k}

    def config(self, plan: Plan) -> Any:
        """The ``GKDConfig`` of this plan, with the memory options the plan chose (the child's and the baselines')."""
        from block_library.memory import layer_sizes
        from puzzle.distill import GKDConfig

        s = GKDSettings.of(plan)
        shapes = Shapes(plan.parent_config, tuple(layer_sizes(plan.parent_config)))
        checkpointing, offload = memory_options(plan, plan.cluster, shapes)  # as planned
        return GKDConfig(sources=s.data, steps=s.gkd_steps, batch=s.gkd_batch, seed=s.seed,
                         val_sequences=min(GKDConfig.val_sequences, s.eval_sequences),
                         activation_checkpointing=checkpointing, offload=offload)

    def teacher(self, ctx: StageContext, cfg: Any) -> Any:
        """The parent's cached targets on ``cfg``'s tokens with the plan's ``gkd_top_k``, or None (0: a live parent).
        Kept in ``<shared dir>/teacher/``: computed once, read by the child's GKD, every baseline's and every search
        sharing the directory on the same tokens (other seeds visit the same sequences)."""
        from puzzle.distill.gkd import gkd_train_ids
        from puzzle.distill.teacher_cache import teacher_targets

        top_k = GKDSettings.of(ctx.plan).gkd_top_k
        if not top_k:
            return None
        k = min(top_k, ctx.parent.config.vocab_size)  # a tiny vocabulary: every token, the exact KL
        path = ctx.shared_dir / "teacher" / f"gkd-top{k}.safetensors"
        return teacher_targets(ctx.parent, gkd_train_ids(cfg, ctx.tokenizer), k, path, progress=ctx.progress)

    def sharded_teacher(self, ctx: StageContext, cfg: Any, parent: Any) -> Any:
        """Under torchrun: the parent's targets as :meth:`teacher`'s, computed with its layers split over the ranks
        (in ``parent``'s dtype: bf16 on GPUs, as the sharded live teacher runs) and read whole by every rank, or None.
        ``parent`` is the stored (meta) parent the GKD run fingerprints; the targets are keyed by the same
        ``files_fingerprint``, so they are this run's parent's."""
        from block_library.distributed import init_shard
        from puzzle.distill.artifact import files_fingerprint
        from puzzle.distill.gkd import gkd_train_ids
        from puzzle.distill.teacher_sharded import sharded_targets

        top_k = GKDSettings.of(ctx.plan).gkd_top_k
        if not top_k:
            return None
        k = min(top_k, parent.config.vocab_size)
        shard = init_shard([1.0] * ctx.world)  # the search's group (joined), with this rank's device for NCCL
        path = ctx.shared_dir / "teacher" / f"gkd-top{k}-sharded.safetensors"
        return sharded_targets(ctx.source, gkd_train_ids(cfg, ctx.tokenizer), k, path, shard=shard,
                               parent_sha256=files_fingerprint(parent), dtype=next(parent.parameters()).dtype,
                               progress=ctx.progress)

    def distill(self, ctx: StageContext, model: Any, directory: Path) -> Any:
        """One process: ``model`` distilled from the parent (its checkpoints in ``directory``); a ``GKDResult``."""
        from puzzle.distill import distill_child

        cfg = self.config(ctx.plan)
        return resume_or_restart(distill_child, model, ctx.parent, ctx.tokenizer, directory, cfg,
                                 progress=ctx.progress, teacher=self.teacher(ctx, cfg))

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from puzzle.loading import load_layers, load_model, save_runtime

        s, source = GKDSettings.of(ctx.plan), ctx.out("fuse", "model")
        if s.gkd_steps == 0:  # the fused (or assembled) child goes on as it is
            return {"model": source, "steps": 0}
        if ctx.world > 1:  # FSDP2: every rank reads its shards of both models from their files
            import torch

            from puzzle.distill import distill_child

            teacher_dtype = torch.bfloat16 if not ctx.plan.cluster.is_cpu else torch.float32
            child, parent = load_layers(source, []), load_layers(ctx.source, [], dtype=teacher_dtype)
            cfg = self.config(ctx.plan)
            result = resume_or_restart(distill_child, child, parent, ctx.tokenizer, directory / "gkd", cfg,
                                       progress=ctx.progress, teacher=self.sharded_teacher(ctx, cfg, parent))
            return {"model": str(directory / "gkd" / "child"), "steps": s.gkd_steps, "initial": result.initial,
                    "final": result.final}
        result = self.distill(ctx, load_model(source), directory / "gkd")
        save_runtime(result.model, directory / "child", overwrite=True)
        return {"model": str(directory / "child"), "steps": s.gkd_steps, "initial": result.initial,
                "final": result.final}

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        s, W = GKDSettings.of(plan), cluster.count
        P, C = shapes.parent_params, shapes.child_params
        if s.gkd_steps == 0:
            return stage_use(self.name, "off (0 steps)", one_rank(cluster, device=base_bytes(cluster), seconds=0.0),
                             cluster)
        checkpointing, offload = memory_options(plan, cluster, shapes)
        device = _rank_bytes(plan, cluster, shapes, checkpointing=checkpointing, offload=offload)
        how = f"FSDP2 over {W} ranks: student and teacher sharded" if W > 1 else "one process: student and teacher whole"
        host = host_bytes(cluster, device)
        if checkpointing:
            how += ", activation checkpointing"
        if offload:
            host = PROCESS_BYTES + TRAIN_BYTES_PER_PARAM * C / W
            how += ", the student's fp32 state in host RAM (CPU offload)"
        if s.gkd_top_k and W == 1:  # the parent's targets, computed once, held in host RAM beside the rest
            from puzzle.distill.teacher_cache import bytes_per_token

            cache = s.gkd_steps * s.gkd_batch * SEQ_LEN * bytes_per_token(s.gkd_top_k, shapes.parent.hidden_size)
            host += cache
            how += f", the parent's top-{s.gkd_top_k} targets cached ({cache / 2**30:.2f} GiB in host RAM)"
        held, file = sharded_cache(plan, shapes, W)  # under torchrun; `device` holds it already on the CPU
        if held:
            k = min(s.gkd_top_k, shapes.parent.vocab_size)
            how += (f", the parent's top-{k} targets computed layer-sharded once ({file / 2**30:.2f} GiB), "
                    "read by every rank")
        # Per token: the student's forward and backward (6 C, 8 C recomputing the forward) and the parent's forward
        # (2 P): live, in every step; cached, once, in the layer-sharded pass that writes the targets (each rank
        # runs its layers, pipelined), the training steps then 6 C or 8 C alone.
        flops = s.gkd_steps * s.gkd_batch * SEQ_LEN * ((8 if checkpointing else 6) * C + 2 * P) / W
        ranks = _ranks(cluster, len(shapes.layers), device=device, host=host, cache=(held, file), child_disk=C * 4,
                       seconds=flops / cluster.flops_per_rank)
        return stage_use(self.name, how, ranks, cluster)


def _ranks(cluster: Cluster, layers: int, *, device: float, host: float, cache: tuple[float, float],
           child_disk: float, seconds: float) -> list[RankUse]:
    """Every rank of the run: ``device`` and ``host`` in training, plus the torchrun cache ``(held, file)`` every rank
    reads into host RAM (on the CPU ``device`` holds it already). Rank 0 writes the child, the last rank the cache:
    before training, its parent layers freed, it holds its chunks' targets, the file read back and, while that
    widens its token ids, their int32 copy (``held - file``)."""
    held, file = cache
    ranks = []
    for r in range(cluster.count):
        rank_device, rank_host = device, host if cluster.is_cpu else host + held
        disk = child_disk if r == 0 else 0.0
        if held and r == cluster.count - 1:
            writing, disk = PROCESS_BYTES + 2 * held + (held - file), disk + file
            rank_device = max(rank_device, writing) if cluster.is_cpu else rank_device
            rank_host = rank_device if cluster.is_cpu else max(rank_host, writing)
        ranks.append(RankUse(r, (0, layers), rank_device, rank_host, disk, seconds))
    return ranks


STAGE = GKDStage()
