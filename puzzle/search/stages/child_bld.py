"""``child_bld``: child-aware BLD retrains the MIP's child's replaced sub-blocks on the child's own activations
(:mod:`puzzle.distill.child_bld`), after a least-squares refit of its pruned FFNs (``child_refit``).

    run/child_bld/child/           the child (runtime checkpoint)
    run/child_bld/losses.csv       each trained sub-block's NMSE per step

One process: parent and child whole. Under torchrun every rank holds its layers of both and the streams pass rank
to rank (:mod:`puzzle.distill.child_bld_sharded`: the same weights). Off (``child_bld_tokens`` 0), rank 0 assembles
the MIP's child tensor by tensor. The baselines get the same training in one process (:meth:`train`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from block_library.memory import TRAIN_BYTES_PER_PARAM, embedding_params
from puzzle.search.cluster import DISK_BYTES_PER_S, Cluster
from puzzle.search.context import StageContext
from puzzle.search.plan import Plan
from puzzle.search.resources import Shapes, StageUse, base_bytes, one_rank, stage_use
from puzzle.search.setting import Section
from puzzle.search.stages.base import Stage

log = logging.getLogger(__name__)

STREAM_BYTES_PER_S = {"cpu": 1.0e9, "gpu": 2.0e10}
"""Rate of one rank's stream to the next (gloo over local sockets on the CPU; NCCL between GPUs, as across nodes)."""


@dataclass(frozen=True)
class ChildBLDSettings(Section):
    child_bld_tokens: int
    child_refit: bool
    seed: int
    data: tuple[str, ...]
    bld_eval_sequences: int
    bld_tokens: int
    """Child-aware BLD reads the train split's sequences after the library's calibration and BLD ones."""


def refit_key(plan: Plan) -> dict[str, Any]:
    """The child-stream refit's part of a key: its settings when it is on, nothing when off (runs from before the
    setting keep their keys)."""
    from puzzle.distill.child_bld import ChildBLDConfig

    if not ChildBLDSettings.of(plan).child_refit:
        return {}
    cfg = ChildBLDConfig(tokens=1)
    return {"child_refit": {"drift": cfg.refit_drift, "ridge": cfg.refit_ridge, "select": cfg.refit_select}}


def training_key(plan: Plan) -> dict[str, Any]:
    """What a model trained by this stage depends on besides its inputs (the baselines' keys hold it too)."""
    s = ChildBLDSettings.of(plan)
    return {"child_bld": [s.child_bld_tokens, s.seed], **refit_key(plan)}


def training_ids(plan: Plan, tokenizer: Any, cfg: Any) -> Any:
    """Child-aware BLD's training ids for ``cfg`` (a ``ChildBLDConfig``): the train split's sequences after the
    library's calibration and BLD ones."""
    from puzzle.distill.child_bld import training_ids as ids_after

    s = ChildBLDSettings.of(plan)
    return ids_after(s.data, tokenizer, cfg, skip=s.bld_eval_sequences + s.bld_tokens // cfg.seq_len)


class ChildBLDStage(Stage):
    name, order = "child_bld", 60
    sections = (ChildBLDSettings,)
    sharded = True

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        s = ChildBLDSettings.of(plan)
        return {"solve": upstream["solve"], "bld": upstream["bld"], "tokens": s.child_bld_tokens, "seed": s.seed,
                "data": list(s.data), "after": [s.bld_eval_sequences, s.bld_tokens], **refit_key(plan)}

    def train(self, ctx: StageContext, model: Any, directory: Path) -> Any:
        """Child-aware BLD of ``model`` as the plan says, checkpoints and ``losses.csv`` in ``directory`` (a
        ``ChildBLDResult``). The search's child and its baselines get the same."""
        from puzzle.distill.child_bld import ChildBLDConfig, ChildBLDResult, replaced_subblocks, train_child_blocks

        if not replaced_subblocks(model, ctx.parent):  # the parent's own sub-blocks and no-ops: nothing to train
            return ChildBLDResult(model=model, trained=[], steps=0, tokens=0, seconds=0.0)
        s = ChildBLDSettings.of(ctx.plan)
        cfg = ChildBLDConfig(tokens=s.child_bld_tokens, seed=s.seed, refit=bool(s.child_refit))
        ids = training_ids(ctx.plan, ctx.tokenizer, cfg)
        return train_child_blocks(model, ctx.parent, ids, cfg, directory=directory, progress=ctx.progress)

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from block_library import open_library
        from puzzle.schema import load_blocks

        lib = open_library(ctx.out("bld", "library"))
        blocks = load_blocks(ctx.out("solve", "blocks"))
        if ChildBLDSettings.of(ctx.plan).child_bld_tokens == 0:  # off: the MIP's child as it is, tensor by tensor
            if ctx.first:
                lib.assemble_to(blocks, directory / "child", overwrite=True)
            return {"model": str(directory / "child"), "tokens": 0}
        if ctx.world > 1:  # every rank trains its layers; rank 0 writes the child
            result = self.train_sharded(ctx, lib, blocks, directory)
        else:
            from puzzle.loading import save_runtime

            result = self.train(ctx, lib.assemble(blocks), directory)
            save_runtime(result.model, directory / "child", overwrite=True)
        log.info("child-aware BLD: %d sub-blocks, NMSE %.4g -> %.4g, %.0f tokens/s", len(result.trained),
                 result.summary()["first_nmse"], result.summary()["last_nmse"], result.tokens_per_s)
        return {"model": str(directory / "child"), "losses": str(directory / "losses.csv"), **result.summary()}

    def train_sharded(self, ctx: StageContext, lib: Any, blocks: Any, directory: Path) -> Any:
        """The search's child trained with its layers split over the ranks, written to ``directory / "child"``
        (every rank calls it; a ``ChildBLDResult`` whose ``model`` is that directory)."""
        from puzzle.distill.child_bld import ChildBLDConfig
        from puzzle.distill.child_bld_sharded import train_child_sharded
        from puzzle.distill.sharding import on_rank0

        s = ChildBLDSettings.of(ctx.plan)
        cfg = ChildBLDConfig(tokens=s.child_bld_tokens, seed=s.seed, refit=bool(s.child_refit))
        ids = on_rank0(lambda: training_ids(ctx.plan, ctx.tokenizer, cfg), ctx.group)  # read once, sent to all
        return train_child_sharded((lib, blocks), ctx.source, ids, cfg, directory / "child", directory=directory,
                                   progress=ctx.progress)

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        from puzzle.distill.child_bld import ChildBLDConfig
        from puzzle.export.memory import assembly_peak_bytes

        s, config, sizes = ChildBLDSettings.of(plan), shapes.parent, shapes.layers
        child, C = shapes.child_config, shapes.child_params
        if s.child_bld_tokens == 0:
            assembly = assembly_peak_bytes(child)  # rank 0 writes the MIP's child tensor by tensor
            return stage_use(self.name, "rank 0: the child assembled tensor by tensor (child-aware BLD off)",
                             one_rank(cluster, device=assembly if cluster.is_cpu else base_bytes(cluster),
                                      host=assembly, disk=C * 4, seconds=2 * C * 4 / DISK_BYTES_PER_S), cluster)
        cfg, per_layer = ChildBLDConfig(tokens=s.child_bld_tokens), _trained_params(shapes)
        if cluster.count > 1:
            return self._layer_sharded(s, cfg, cluster, shapes, per_layer)
        P, decoder = shapes.parent_params, C - embedding_params(config) * (1 if config.tie_word_embeddings else 2)
        trained = sum(per_layer)
        H, I = config.hidden_size, max(x.ffn_width for x in sizes)
        B, T = cfg.step_batch, cfg.seq_len
        peak = base_bytes(cluster) + (P + C) * 4 + TRAIN_BYTES_PER_PARAM * trained + _activations(config, B, T, I)
        teacher = sum(x.parent_params for x in sizes)
        flops = cfg.steps * B * T * (2 * teacher + 2 * decoder + 4 * trained)
        if s.child_refit:  # before the training: the streams, one chunk, one layer's G and C; forward passes only
            from puzzle.distill.child_refit import refit_bytes, refit_flops

            n = cfg.steps * B * T
            rc = ChildBLDConfig(tokens=1)
            refit = refit_bytes(n, H, I, 4, B * T, drift=rc.refit_drift > 0, select=rc.refit_select)
            peak = max(peak, base_bytes(cluster) + (P + C) * 4 + refit)
            flops += n * (2 * decoder + 4 * teacher) + len(sizes) * refit_flops(n, H, I, rc.refit_select)
        how = "one process: parent and child whole, the replaced sub-blocks trained"
        return stage_use(self.name, how + (", after the child-stream refit" if s.child_refit else ""),
                         one_rank(cluster, device=peak, disk=C * 4, layers=(0, len(sizes)),
                                  seconds=flops / cluster.flops_per_rank + 2 * C * 4 / DISK_BYTES_PER_S), cluster)

    def _layer_sharded(self, s: ChildBLDSettings, cfg: Any, cluster: Cluster, shapes: Shapes,
                       per_layer: list[int]) -> StageUse:
        """Each rank: its layers of parent and child (rank 0 the embedding, twice with the refit's drift), the AdamW
        state of its trained sub-blocks, one layer's activations and the stream in and out; with the refit, the
        streams of every training token through its layers and one layer's G and C. The refit runs rank after rank
        (each waits for the ones before it), the training steps pipelined; two checkpoints per rank on disk."""
        from puzzle.distill.child_bld import ChildBLDConfig
        from puzzle.distill.child_refit import refit_bytes, refit_flops
        from puzzle.distill.teacher_sharded import layer_ranges
        from puzzle.evaluation.memory import layer_params
        from puzzle.search.resources import RankUse, host_bytes, layer_range

        config, sizes, child, C = shapes.parent, shapes.layers, shapes.child_config, shapes.child_params
        world = min(cluster.count, len(sizes))
        child_layers, ranges = layer_params(child), layer_ranges(child, world)
        rc = ChildBLDConfig(tokens=1)
        drift = s.child_refit and rc.refit_drift > 0
        H, B, T, fps = config.hidden_size, cfg.step_batch, cfg.seq_len, cluster.flops_per_rank
        n, stream = cfg.steps * B * T, B * T * H * 4  # training tokens; one step's stream (float32)
        link = STREAM_BYTES_PER_S["cpu" if cluster.is_cpu else "gpu"]
        out, refit_done = [], 0.0
        for rank, layers in enumerate(ranges):
            teacher, decoder = sum(sizes[l].parent_params for l in layers), sum(child_layers[l] for l in layers)
            trained, I = sum(per_layer[l] for l in layers), max(sizes[l].ffn_width for l in layers)
            weights = (teacher + decoder) * 4 + (embedding_params(config) * 4 * (2 if drift else 1) if rank == 0 else 0)
            peak = (base_bytes(cluster) + weights + TRAIN_BYTES_PER_PARAM * trained + _activations(config, B, T, I)
                    + 2 * stream)
            edges = (rank > 0) + (rank < world - 1)  # streams received and sent
            seconds = (cfg.steps * B * T * (2 * teacher + 2 * decoder + 4 * trained) / fps
                       + cfg.steps * stream * edges / link)
            if s.child_refit:
                refit = refit_bytes(n, H, I, 4, B * T, drift=drift, select=rc.refit_select)
                peak = max(peak, base_bytes(cluster) + weights + refit)
                refit_done += (n * (2 * decoder + 4 * teacher) + len(layers) * refit_flops(n, H, I, rc.refit_select)
                               ) / fps + n * H * 4 * (2 if drift else 1) * (rank > 0) / link
                seconds += refit_done
            # on disk: its tensors, two checkpoints (weights and AdamW moments); rank 0 reads and writes the child
            disk = (4 + 2 * 12) * trained + (C * 4 if rank == 0 else 0)
            seconds += (4 * trained + (2 * C * 4 if rank == 0 else 0)) / DISK_BYTES_PER_S
            staged = 4 * (teacher + decoder)  # read into host memory before the device
            out.append(RankUse(rank, layer_range(layers), peak, host_bytes(cluster, peak, staged), disk, seconds))
        how = (f"layer-sharded over {world} ranks: each trains the replaced sub-blocks of its layers, the streams "
               "passed rank to rank" + (", after the child-stream refit (rank after rank)" if s.child_refit else ""))
        return stage_use(self.name, how, out, cluster)


def _trained_params(shapes: Shapes) -> list[int]:
    """Each layer's parameters in sub-blocks that differ from the parent's (before the MIP, every one: an upper
    bound)."""
    from puzzle.summary import attention_params, ffn_params

    config = shapes.parent
    return [attention_params(c.attention, config) * (shapes.child is None or c.attention != p.attention)
            + ffn_params(c.ffn, config) * (shapes.child is None or c.ffn != p.ffn)
            for c, p in zip(shapes.child_config.blocks, config.blocks)]


def _activations(config: Any, B: int, T: int, I: int) -> float:
    """One layer's activations and their backward (the stream, norms, q/k/v/o, the FFN's projections), SDPA's scores."""
    H = config.hidden_size
    return B * T * (16 * H + 4 * I) * 4 + B * config.num_attention_heads * T * T * 4


STAGE = ChildBLDStage()
