"""``gkd``: global knowledge distillation of the whole child from the parent's next-token distribution
(:mod:`puzzle.distill.gkd`).

    run/gkd/child/                 the distilled child (runtime checkpoint)
    run/gkd/gkd/                   checkpoints, losses, validation before and after
    <shared>/teacher/gkd-topK.safetensors           the parent's top-k targets, computed once (``gkd_top_k``)
    <shared>/teacher/gkd-topK-sharded.safetensors   the same, computed layer-sharded under torchrun
    <shared>/teacher/gkd-topK-val-sharded.safetensors   and the validation sequences' (torchrun)

In one process student and teacher are whole. Under torchrun FSDP2 shards the student over the ranks;
the parent's top-k targets on the training and on the validation sequences are computed once with its
layers split over the ranks (:func:`puzzle.distill.teacher_sharded.sharded_targets`, the last rank writing
the files a chunk at a time) and every rank reads the rows of its own share of the steps' batches and of the
validation sequences, 1/W of the files, so no rank loads the parent in GKD (``gkd_top_k`` 0: FSDP2 shards it too and it
runs live). The one-process and the sharded files differ by their parent fingerprint: a loaded parent's
weights (``model_fingerprint``, one process) or its stored files (``files_fingerprint``: under torchrun
no rank holds the whole parent, and the GKD run fingerprints its stored parent so); side by side, a
search that changes its number of ranks, or the one-process baselines beside a sharded GKD, reuse their
own file instead of replacing each other's. Activation checkpointing, CPU offload and, when the whole
student still does not fit, training the decoder or the replaced sub-blocks alone are switched on when
the plan says a rank needs them (:func:`memory_options`). The baselines get the same distillation
(:meth:`distill`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from block_library.memory import PROCESS_BYTES, TRAIN_BYTES_PER_PARAM, embedding_params
from puzzle.search.cluster import DISK_BYTES_PER_S, Cluster
from puzzle.search.context import StageContext, resume_or_restart
from puzzle.search.plan import Plan
from puzzle.search.resources import SEQ_LEN, RankUse, Shapes, StageUse, base_bytes, host_bytes, one_rank, stage_use
from puzzle.search.setting import Section
from puzzle.search.stages.base import Stage
from puzzle.search.gkd_time import gkd_seconds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GKDSettings(Section):
    gkd_steps: int
    gkd_batch: int
    gkd_top_k: int
    seed: int
    data: tuple[str, ...]
    eval_sequences: int
    """GKD's own validation (before and after) is a progress check: no larger than the final evaluation."""
    quality_context: int
    """Tokens per training and validation sequence."""


def context_key(s: GKDSettings) -> dict[str, Any]:
    """The sequences' length in a key, when it is not the 256 tokens of the runs from before the setting."""
    return {} if s.quality_context == SEQ_LEN else {"seq_len": s.quality_context}


def training_key(plan: Plan) -> dict[str, Any]:
    """What a model distilled by this stage depends on besides its inputs (the baselines' keys hold it too): what it
    trains only when not every weight (the runs from before the memory plan's fallbacks keep their keys)."""
    s, train = GKDSettings.of(plan), planned_options(plan)[2]
    return {"gkd": [s.gkd_steps, s.gkd_batch, s.seed, s.gkd_top_k], **context_key(s),
            **({"gkd_train": train} if train != "all" else {})}


TRAIN_WHAT = {"decoder": "the decoder only", "replaced": "the replaced sub-blocks only"}


def memory_options(plan: Plan, cluster: Cluster, shapes: Shapes) -> tuple[bool, bool, str]:
    """``(activation_checkpointing, offload, train)``: the first that fits a rank of: every weight trained (no
    checkpointing; checkpointing; and on GPUs the student's fp32 state in host RAM, FSDP2's CPU offload), then,
    with checkpointing (and offload), the decoder alone (``train="decoder"``), then the replaced sub-blocks alone
    (``"replaced"``: :mod:`puzzle.distill.trainable`); the last when none does (the plan then says it does not fit).

    Decided for the largest child, the parent, before the MIP and after it alike, so a run trains what its plan
    said whichever child the MIP chose. Before the MIP the replaced sub-blocks are unknown: that rung is planned
    with every one of the parent's weights frozen, and once the child is known the plan counts its replaced
    sub-blocks (the stage checks them against the memory before it trains)."""
    bound = replace(shapes, child=None)
    for checkpointing, offload, train in _ladder(cluster):
        if _rank_bytes(plan, cluster, bound, checkpointing=checkpointing, offload=offload, train=train) \
                <= cluster.memory_per_rank:
            return checkpointing, offload, train
    return _ladder(cluster)[-1]


def planned_options(plan: Plan) -> tuple[bool, bool, str]:
    """:func:`memory_options` on the plan's own cluster: what the stage runs with (the child's and the baselines')."""
    from block_library.memory import layer_sizes

    return memory_options(plan, plan.cluster, Shapes(plan.parent_config, tuple(layer_sizes(plan.parent_config))))


def _ladder(cluster: Cluster) -> list[tuple[bool, bool, str]]:
    offload = [False] if cluster.is_cpu else [False, True]  # CPU offload: GPUs only
    return [(False, False, "all")] + [(True, o, train) for train in ("all", "decoder", "replaced") for o in offload]


def _split(shapes: Shapes, train: str) -> Any:
    """The child's trained and frozen parameters (:func:`puzzle.distill.trainable.param_split`); a child of another
    depth than the parent's (fused) with ``replaced``: the parent's own, all frozen (the run refuses it)."""
    from puzzle.distill.trainable import param_split

    child = shapes.child_config
    if train == "replaced" and len(child.blocks) != len(shapes.parent.blocks):
        child = shapes.parent
    return param_split(child, shapes.parent, train)


def _rank_bytes(plan: Plan, cluster: Cluster, shapes: Shapes, *, checkpointing: bool, offload: bool,
                train: str = "all") -> float:
    from puzzle.distill.memory import FROZEN_BYTES_PER_PARAM, gathered_bytes, gkd_rank_bytes, loss_units_bytes

    s, config, world = GKDSettings.of(plan), shapes.parent, cluster.count
    split = _split(shapes, train)
    P, C = shapes.parent_params, split.trained + split.frozen
    vh = embedding_params(config)
    units = gathered_bytes(split.layers, split.edges, vocab_hidden=vh, tied=split.tied)
    at_loss = loss_units_bytes(split.layers, split.edges, vocab_hidden=vh, tied=split.tied, units=units)
    # one process with gkd_top_k: the training steps read the parent's targets cached in host RAM (its validation
    # passes run the parent live, chunk by chunk, without a graph: smaller than a step)
    cached = _cached(plan, world) or (world == 1 and bool(s.gkd_top_k))
    device = gkd_rank_bytes(C, P, unit_bytes=units, world=world, micro_batch=max(1, s.gkd_batch // world),
                            seq_len=s.quality_context, hidden=config.hidden_size, layers=len(shapes.layers),
                            vocab=config.vocab_size, checkpointing=checkpointing, dtype_bytes=cluster.dtype_bytes,
                            frozen_params=split.frozen, teacher=not cached, loss_unit_bytes=at_loss)
    if world == 1:
        device += C * 4  # the child as loaded, beside its fp32 student copy
        if cached:  # the parent is loaded all the same, for the validation
            device += cluster.dtype_bytes * P
    elif cluster.is_cpu:  # one memory: the cached targets every rank holds count against it
        device += sharded_cache(plan, shapes, world)[0]
    if offload:  # the fp32 student shards, their gradients and moments move to host RAM
        device -= (TRAIN_BYTES_PER_PARAM * split.trained + FROZEN_BYTES_PER_PARAM * split.frozen) / world
    return base_bytes(cluster) + device


def _cached(plan: Plan, world: int) -> bool:
    """Under torchrun with ``gkd_top_k``: the parent's targets of the training and the validation sequences are
    cached, and no rank loads the parent in GKD."""
    return world > 1 and bool(GKDSettings.of(plan).gkd_top_k)


def sharded_cache(plan: Plan, shapes: Shapes, world: int) -> tuple[float, float]:
    """``(held, file)``: bytes of the parent's top-k targets a rank holds under torchrun (the rows of its share of
    every step's batch and of the validation sequences, :func:`puzzle.distill.gkd.train_rows` and ``val_rows``; their
    token ids widened to int64 in memory) and of the files (the training and the validation sequences'); ``(0, 0)``
    when there is none (``gkd_top_k`` 0, or one process: :meth:`GKDStage.resources` counts that cache itself)."""
    from puzzle.distill import GKDConfig
    from puzzle.distill.teacher_cache import bytes_per_token

    s = GKDSettings.of(plan)
    if world == 1 or not s.gkd_top_k:
        return 0.0, 0.0
    k = min(s.gkd_top_k, shapes.parent.vocab_size)
    train, val = s.gkd_steps * s.gkd_batch, min(GKDConfig.val_sequences, s.eval_sequences)
    mine = min(train, s.gkd_steps * (s.gkd_batch // world)) + -(-val // world)  # sequences a rank reads
    per_token = bytes_per_token(k, shapes.parent.hidden_size)
    return float(mine * s.quality_context * (per_token + 4 * k)), float((train + val) * s.quality_context * per_token)


def _teacher_pass(plan: Plan, cluster: Cluster, shapes: Shapes) -> list[float]:
    """Under torchrun with cached targets, each rank's peak while they are computed layer-sharded before training
    (:func:`puzzle.distill.memory.teacher_pass_bytes`, the process included); zeros without."""
    from puzzle.distill.memory import teacher_pass_bytes

    if not _cached(plan, cluster.count):
        return [0.0] * cluster.count
    return [base_bytes(cluster) + b for b in teacher_pass_bytes(shapes.parent, cluster.count,
                                                                 seq_len=GKDSettings.of(plan).quality_context,
                                                                 dtype_bytes=cluster.dtype_bytes)]


def _trained_how(plan: Plan, cluster: Cluster, shapes: Shapes, train: str) -> str:
    """What a fallback rung trains and why: its share of the child, the rungs before it that do not fit, and the
    smallest cluster of the same device where every weight trains."""
    from puzzle.search.resources import CLUSTER_SIZES, GIB
    from puzzle.summary import format_count

    split = _split(shapes, train)
    share = f"{format_count(split.trained)} of {format_count(split.trained + split.frozen)} parameters trained"
    if train == "replaced" and shapes.child is None:
        share = "the MIP's child's, planned with the parent's own weights frozen and counted again once it is chosen"
    elif train == "decoder":
        share += ", the embedding and LM head frozen"
    bound, limit = replace(shapes, child=None), cluster.memory_per_rank / GIB
    why = f"the whole student's fp32 state does not fit {limit:.1f} GiB per rank"
    if train == "replaced":
        why += ", nor the decoder's"
    fits = next((n for n in CLUSTER_SIZES if cluster.count < n <= len(shapes.layers)
                 and memory_options(plan, cluster.with_count(n), bound)[2] == "all"), None)
    where = f"{cluster.with_count(fits).name} fits it" if fits else \
        f"no cluster of up to {len(shapes.layers)}x{cluster.device} fits it"
    return f"; {TRAIN_WHAT[train]} ({share}): {why}; {where}"


class GKDStage(Stage):
    name, order = "gkd", 80
    sections = (GKDSettings,)
    sharded = True
    whole_parent = True

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        s, train = GKDSettings.of(plan), planned_options(plan)[2]
        return {"fuse": upstream["fuse"], "steps": s.gkd_steps, "batch": s.gkd_batch, "seed": s.seed,
                "data": list(s.data), "top_k": s.gkd_top_k, **context_key(s),
                **({"train": train} if train != "all" else {})}

    def config(self, plan: Plan) -> Any:
        """The ``GKDConfig`` of this plan, with the memory options the plan chose (the child's and the baselines')."""
        from puzzle.distill import GKDConfig

        s = GKDSettings.of(plan)
        checkpointing, offload, train = planned_options(plan)
        return GKDConfig(sources=s.data, steps=s.gkd_steps, batch=s.gkd_batch, seed=s.seed, seq_len=s.quality_context,
                         val_sequences=min(GKDConfig.val_sequences, s.eval_sequences),
                         activation_checkpointing=checkpointing, offload=offload, train=train)

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

    def sharded_teacher(self, ctx: StageContext, cfg: Any, parent: Any, *, validation: bool = False) -> Any:
        """Under torchrun: the parent's targets as :meth:`teacher`'s, computed with its layers split over the ranks
        (in ``parent``'s dtype: bf16 on GPUs, as the sharded live teacher runs) and read whole by every rank, or None.
        ``parent`` is the stored (meta) parent the GKD run fingerprints; the targets are keyed by the same
        ``files_fingerprint``, so they are this run's parent's. ``validation``: those of the validation sequences,
        with the parent's log-probability of each next token (``gkd-topK-val-sharded.safetensors``)."""
        from block_library.distributed import init_shard
        from puzzle.distill.artifact import files_fingerprint
        from puzzle.distill.gkd import gkd_train_ids, gkd_val_ids, train_rows, val_rows
        from puzzle.distill.teacher_sharded import sharded_targets

        top_k = GKDSettings.of(ctx.plan).gkd_top_k
        if not top_k:
            return None
        k = min(top_k, parent.config.vocab_size)
        shard = init_shard([1.0] * ctx.world)  # the search's group (joined), with this rank's device for NCCL
        path = ctx.shared_dir / "teacher" / f"gkd-top{k}{'-val' if validation else ''}-sharded.safetensors"
        ids = gkd_val_ids(cfg, ctx.tokenizer) if validation else gkd_train_ids(cfg, ctx.tokenizer)
        n = ids.shape[0]  # this rank reads only the rows it trains on (or validates)
        rows = val_rows(n, shard.rank, shard.world) if validation else train_rows(cfg, n, shard.rank, shard.world)
        return sharded_targets(ctx.source, ids, k, path, shard=shard, parent_sha256=files_fingerprint(parent),
                               dtype=next(parent.parameters()).dtype, labels=validation, progress=ctx.progress,
                               rows=rows)

    def distill(self, ctx: StageContext, model: Any, directory: Path) -> Any:
        """One process: ``model`` distilled from the parent (its checkpoints in ``directory``); a ``GKDResult``."""
        from puzzle.distill import distill_child

        cfg = self.config(ctx.plan)
        return resume_or_restart(distill_child, model, ctx.parent, ctx.tokenizer, directory, cfg,
                                 progress=ctx.progress, teacher=self.teacher(ctx, cfg))

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from puzzle.loading import load_config, load_model, save_runtime

        s, source = GKDSettings.of(ctx.plan), ctx.out("fuse", "model")
        if s.gkd_steps == 0:  # the fused (or assembled) child goes on as it is
            return {"model": source, "steps": 0}
        cfg = self.config(ctx.plan)
        if cfg.train != "all" and not self._fits_child(ctx, cfg, load_config(source)):
            return {"model": source, "steps": 0, "train": cfg.train}
        if ctx.world > 1:  # FSDP2: every rank reads its shards of the student (and of a live parent) from the files
            return self._sharded(ctx, directory, source, cfg)
        result = self.distill(ctx, load_model(source), directory / "gkd")
        save_runtime(result.model, directory / "child", overwrite=True)
        return {"model": str(directory / "child"), "steps": s.gkd_steps, "initial": result.initial,
                "final": result.final}

    def _sharded(self, ctx: StageContext, directory: Path, source: str, cfg: Any) -> dict[str, Any]:
        """Under torchrun: the stored child distilled with FSDP2 on the parent's cached targets (training and
        validation: no rank loads the parent), or on the sharded live parent (``gkd_top_k`` 0)."""
        import torch

        from puzzle.distill import distill_child
        from puzzle.loading import load_layers

        s, cluster = GKDSettings.of(ctx.plan), ctx.plan.cluster
        teacher_dtype = torch.bfloat16 if not cluster.is_cpu else torch.float32
        child, parent = load_layers(source, []), load_layers(ctx.source, [], dtype=teacher_dtype)
        teacher = self.sharded_teacher(ctx, cfg, parent)
        val = self.sharded_teacher(ctx, cfg, parent, validation=True)
        result = resume_or_restart(distill_child, child, parent, ctx.tokenizer, directory / "gkd", cfg,
                                   progress=ctx.progress, teacher=teacher, val_teacher=val)
        return {"model": str(directory / "gkd" / "child"), "steps": s.gkd_steps, "initial": result.initial,
                "final": result.final, **({"train": cfg.train} if cfg.train != "all" else {})}

    def _fits_child(self, ctx: StageContext, cfg: Any, child: Any) -> bool:
        """A fallback rung (``cfg.train``) against the chosen child's config: False (logged) when it has nothing to
        train, so the child goes on as it is; :class:`ResourceError` naming what a rank needs when its replaced
        sub-blocks do not fit (planned before the MIP with the parent's own weights frozen)."""
        from block_library.memory import layer_sizes
        from puzzle.distill.trainable import param_split
        from puzzle.errors import ResourceError
        from puzzle.search.resources import GIB
        from puzzle.summary import format_count

        plan, cluster = ctx.plan, ctx.plan.cluster
        split = param_split(child, plan.parent_config, cfg.train)  # a fused child with "replaced": ConfigError
        if not split.trained:
            log.info("GKD trains %s, and the child has none: it goes on as it is", TRAIN_WHAT[cfg.train])
            return False
        shapes = Shapes(plan.parent_config, tuple(layer_sizes(plan.parent_config)), child)
        need = _rank_bytes(plan, cluster, shapes, checkpointing=cfg.activation_checkpointing, offload=cfg.offload,
                           train=cfg.train)
        if need > cluster.memory_per_rank * (1 + 1e-9):
            raise ResourceError(f"GKD of the chosen child does not fit {cluster.name}: {TRAIN_WHAT[cfg.train]} "
                                f"({format_count(split.trained)} of {format_count(split.trained + split.frozen)} "
                                f"parameters trained) needs {need / GIB:.1f} GiB per rank, more than "
                                f"{cluster.memory_per_rank / GIB:.1f} GiB; rerun with more ranks or --gkd-steps 0 "
                                "(the stages before it are kept)")
        return True

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        s, W = GKDSettings.of(plan), cluster.count
        if s.gkd_steps == 0:
            return stage_use(self.name, "off (0 steps)", one_rank(cluster, device=base_bytes(cluster), seconds=0.0),
                             cluster)
        checkpointing, offload, train = memory_options(plan, cluster, shapes)
        device = _rank_bytes(plan, cluster, shapes, checkpointing=checkpointing, offload=offload, train=train)
        split = _split(shapes, train)
        sharded = "the student sharded" if _cached(plan, W) else "student and teacher sharded"
        how = f"FSDP2 over {W} ranks: {sharded}" if W > 1 else "one process: student and teacher whole"
        host = host_bytes(cluster, device)
        if checkpointing:
            how += ", activation checkpointing"
        if offload:
            host = PROCESS_BYTES + (TRAIN_BYTES_PER_PARAM * split.trained + 4 * split.frozen) / W
            how += ", the student's fp32 state in host RAM (CPU offload)"
        if s.gkd_top_k and W == 1:  # the parent's targets, computed once, held in host RAM beside the rest
            from puzzle.distill.teacher_cache import bytes_per_token

            tokens = s.gkd_steps * s.gkd_batch * s.quality_context
            cache = tokens * bytes_per_token(s.gkd_top_k, shapes.parent.hidden_size)
            host += cache
            how += f", the parent's top-{s.gkd_top_k} targets cached ({cache / 2**30:.2f} GiB in host RAM)"
        held, file = sharded_cache(plan, shapes, W)  # under torchrun; `device` holds it already on the CPU
        if held:
            k = min(s.gkd_top_k, shapes.parent.vocab_size)
            how += (f", the parent's top-{k} targets of the training and validation sequences computed layer-sharded "
                    f"once ({file / 2**30:.2f} GiB), each rank reading its share ({held / 2**30:.2f} GiB): no rank "
                    "loads the parent in training")
        how += f"; {s.gkd_steps} steps of {s.gkd_batch} x {s.quality_context} tokens"
        if train != "all":
            how += _trained_how(plan, cluster, shapes, train)
        ranks = _ranks(cluster, len(shapes.layers), device=device, host=host, cache=(held, file),
                       child_disk=shapes.child_params * 4,
                       seconds=gkd_seconds(s, cluster, shapes, checkpointing=checkpointing, split=split,
                                           cached=_cached(plan, W)),
                       teacher_pass=_teacher_pass(plan, cluster, shapes))
        return stage_use(self.name, how, ranks, cluster)


def _ranks(cluster: Cluster, layers: int, *, device: float, host: float, cache: tuple[float, float],
           child_disk: float, seconds: float, teacher_pass: list[float]) -> list[RankUse]:
    """Every rank of the run: ``device`` and ``host`` in training, plus its share of the torchrun cache ``(held,
    file)`` read into host RAM (on the CPU ``device`` holds it already). Rank 0 writes the child, the last rank the
    cache (a chunk at a time: :class:`~puzzle.distill.targets_file.TargetsWriter`). Before that, ``teacher_pass[r]``:
    rank r computing its share of the targets (on the device; on a GPU its host stages each tensor read)."""
    held, file = cache
    ranks = []
    for r in range(cluster.count):
        rank_device = max(device, teacher_pass[r])
        rank_host = max(host, teacher_pass[r]) if cluster.is_cpu else host + held
        disk = (child_disk if r == 0 else 0.0) + (file if r == cluster.count - 1 else 0.0)
        ranks.append(RankUse(r, (0, layers), rank_device, rank_host, disk, seconds))
    return ranks


STAGE = GKDStage()
