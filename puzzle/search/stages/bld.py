"""``bld``: block-wise local distillation trains every library variant to imitate the parent's block.

    run/library/lib/trained/       the trained weights (in the library, beside the initialized ones)
    run/library/lib/bld/*.csv      each variant's validation NMSE

Layers split over the ranks as in the library stage; each rank trains its variants in rounds that fit
its memory, every round replaying the teacher pass (:mod:`block_library.rounds`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from block_library.memory import (INIT_BYTES_PER_PARAM, TRAIN_BYTES_PER_PARAM, bld_fixed_bytes, round_items,
                                  train_peak_bytes_per_param)
from puzzle.search.cluster import DISK_BYTES_PER_S, Cluster
from puzzle.search.context import StageContext
from puzzle.search.plan import Plan
from puzzle.search.resources import (BLD_BATCH, SEQ_LEN, RankUse, Shapes, StageUse, host_bytes, layer_range,
                                     layer_ranges, round_params, stage_use)
from puzzle.search.stages.base import Stage
from puzzle.search.stages.library import LibrarySettings, library_config


class BLDStage(Stage):
    name, order = "bld", 20
    sections = (LibrarySettings,)
    shareable = sharded = True
    record = ("library/lib/trained/**", "library/lib/index.csv", "library/lib/manifest.json", "library/lib/bld/*.csv")

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        return {"library": upstream["library"], "bld": library_config(plan).sha256()}

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from block_library import train_library

        lib = ctx.out("library", "library")
        # the stage runs only when its manifest is not valid (new key, lost or damaged file): train for real
        train_library(lib, config=library_config(ctx.plan), progress=ctx.progress, force=True,
                      max_memory_bytes=ctx.plan.cluster.memory_per_rank)  # in rounds that fit, as planned
        return {"library": lib, "tokens": LibrarySettings.of(ctx.plan).bld_tokens}

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        s, config, sizes = LibrarySettings.of(plan), shapes.parent, shapes.layers
        db, out, parts = cluster.dtype_bytes, [], []
        ranges = layer_ranges(sizes, cluster.count)
        for rank, layers in enumerate(ranges):
            fixed = bld_fixed_bytes(config, sizes, layers, first=rank == 0, batch=BLD_BATCH, seq_len=SEQ_LEN,
                                    dtype_bytes=db, device="cpu" if cluster.is_cpu else "gpu")
            parts.append((fixed, round_params(round_items(sizes, layers), cluster.memory_per_rank - fixed,
                                              TRAIN_BYTES_PER_PARAM)))
        common = max(len(r) for _, r in parts)  # every rank replays the teacher pass in every round
        for rank, (layers, (fixed, rounds)) in enumerate(zip(ranges, parts)):
            teacher = sum(sizes[l].parent_params for l in layers)
            variants = sum(sizes[l].trainable_params for l in layers)
            checkpoint = 12 * max(rounds)  # weights and two moments of the round in flight
            disk = INIT_BYTES_PER_PARAM * variants + checkpoint
            steps = max(1, s.bld_tokens // (BLD_BATCH * SEQ_LEN))
            peak = fixed + train_peak_bytes_per_param(steps) * max(rounds)  # rounds are sized at 16 B/param
            out.append(RankUse(rank, layer_range(layers), peak, host_bytes(cluster, peak, 4 * teacher), disk,
                               0.0, common))
        seconds = bld_seconds(s, cluster, shapes, ranges, common) + max(u.disk_bytes for u in out) / DISK_BYTES_PER_S
        out = [dataclasses.replace(u, seconds=seconds) for u in out]
        note = f"{common} round{'s' if common != 1 else ''} of variants per rank" if common > 1 else ""
        how = ("layers split over ranks; variants trained in rounds, on 256-token sequences whatever the quality "
               "context (the library is shared by searches at every context; scoring, the finalists, child-aware BLD "
               "and GKD judge and retrain at it)")
        return stage_use(self.name, how, out, cluster, note)


def bld_seconds(s: LibrarySettings, cluster: Cluster, shapes: Shapes, ranges: list[range], rounds: int) -> float:
    """Every round: its steps (the teacher's layers, each variant's forward and backward, AdamW over the round's
    variants) and its validation (the teacher and the variants), batches passed rank to rank; then building and
    loading the trained variants' modules (per parameter)."""
    from puzzle.search.timing import KAPPA, batches, pipeline, rank_clock

    clock, config, sizes = rank_clock(cluster, shapes.parent), shapes.parent, shapes.layers
    steps = max(1, s.bld_tokens // (BLD_BATCH * SEQ_LEN))
    vb, vm = batches(s.bld_eval_sequences, BLD_BATCH)
    step, val, trained = [], [], []
    for r in ranges:
        params = sum(sizes[l].trainable_params for l in r)
        variants = [v for l in r for v in sizes[l].trainable]
        step.append(clock.blocks([config.blocks[l] for l in r], BLD_BATCH, SEQ_LEN)
                    + (KAPPA * sum(clock.variant(v, config, BLD_BATCH, SEQ_LEN) for v in variants)
                       + clock.optimizer(params)) / rounds)
        val.append(clock.blocks([config.blocks[l] for l in r], vb, SEQ_LEN)
                   + sum(clock.variant(v, config, vb, SEQ_LEN) for v in variants) / rounds)
        trained.append(params)
    return rounds * (pipeline(step, steps) + pipeline(val, vm)) + clock.modules(max(trained), "bld")


STAGE = BLDStage()
