"""``library``: every variant of every layer, initialized from the parent (:mod:`block_library`).

    run/library/lib/               the variants' weights, index and manifest (BLD trains them in place)

Layers split over the ranks under torchrun; each rank initializes its variants in rounds that fit
its memory. The library's settings (search space, data, BLD sizes, seed) are one
:class:`block_library.LibraryConfig` that the ``bld`` stage reads as well.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from block_library.memory import INIT_BYTES_PER_PARAM, build_fixed_bytes, embedding_params, gram_bytes, round_items
from puzzle.search.cluster import DISK_BYTES_PER_S, Cluster
from puzzle.search.context import StageContext
from puzzle.search.plan import Plan, plan_space
from puzzle.search.resources import (BLD_BATCH, SEQ_LEN, RankUse, Shapes, StageUse, host_bytes, layer_range,
                                     layer_ranges, round_params, stage_use)
from puzzle.search.setting import Section
from puzzle.search.stages.base import Stage


@dataclass(frozen=True)
class LibrarySettings(Section):
    """The block library's and BLD's settings (the search space comes from the plan: ``space``, ``engine``)."""

    data: tuple[str, ...]
    bld_tokens: int
    bld_eval_sequences: int
    seed: int
    ffn_refit: bool


def library_config(plan: Plan) -> Any:
    """The :class:`block_library.LibraryConfig` of this plan: its search space, data, BLD tokens and seed."""
    from block_library import LibraryConfig
    from puzzle.data.config import DataConfig

    s = LibrarySettings.of(plan)
    steps = max(1, s.bld_tokens // (BLD_BATCH * SEQ_LEN))
    return LibraryConfig(space=plan_space(plan), data=DataConfig(sources=s.data)).with_bld(
        tokens=s.bld_tokens, checkpoint_every=max(1, steps // 4), calib_sequences=s.bld_eval_sequences,
        val_sequences=s.bld_eval_sequences, seed=s.seed, ffn_refit=bool(s.ffn_refit))


class LibraryStage(Stage):
    name, order = "library", 10
    sections = (LibrarySettings,)
    shareable = sharded = True
    # BLD trains the library in place: the build owns the rest, BLD the trained weights, the index and its logs
    record = ("library/lib/**", "!library/lib/trained/**", "!library/lib/index.csv", "!library/lib/manifest.json",
              "!library/lib/bld/**")

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        lib = library_config(plan)
        return {"parent": upstream["parent"], "library": lib.sha256("space", "data"),
                **({"ffn_refit": {"ridge": lib.bld.ffn_ridge}} if lib.bld.ffn_refit else {})}  # off: older runs' keys

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from block_library import build_library

        lib = directory / "lib"
        # the stage runs only when its manifest is not valid: build anew (atomic), which also drops BLD's files
        build_library(ctx.plan.model, lib, library_config(ctx.plan), progress=ctx.progress, overwrite=True,
                      max_memory_bytes=ctx.plan.cluster.memory_per_rank)
        return {"library": str(lib)}

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        s, config, sizes = LibrarySettings.of(plan), shapes.parent, shapes.layers
        db, out, local = cluster.dtype_bytes, [], []
        ranges = layer_ranges(sizes, cluster.count)
        for rank, layers in enumerate(ranges):
            first = rank == 0
            fixed = build_fixed_bytes(config, sizes, layers, first=first, batch=BLD_BATCH, seq_len=SEQ_LEN,
                                      dtype_bytes=db, device="cpu" if cluster.is_cpu else "gpu", ffn_refit=s.ffn_refit)
            rounds = round_params(round_items(sizes, layers), cluster.memory_per_rank - fixed, INIT_BYTES_PER_PARAM)
            teacher = sum(sizes[l].parent_params for l in layers)
            variants = sum(sizes[l].trainable_params for l in layers)
            disk = INIT_BYTES_PER_PARAM * variants + (INIT_BYTES_PER_PARAM * embedding_params(config) if first else 0)
            peak = fixed + INIT_BYTES_PER_PARAM * max(rounds)
            gram = gram_bytes(sizes, layers, ffn_refit=s.ffn_refit)  # host memory; in ``fixed`` on a CPU
            out.append(RankUse(rank, layer_range(layers), peak, host_bytes(cluster, peak, 4 * teacher + gram), disk,
                               0.0, len(rounds)))
            # the build packs every variant it owns into its rounds, the parent's own copies too
            copies = [(f"parent{l}", sizes[l].parent_params) for l in layers]
            built = round_params(round_items(sizes, layers) + copies, cluster.memory_per_rank - fixed,
                                 INIT_BYTES_PER_PARAM)
            local.append((len(built), _rank_seconds(s, cluster, shapes, layers, disk)))
        seconds = _passes_seconds(s, cluster, shapes, ranges, max(n for n, _ in local)) + max(t for _, t in local)
        out = [dataclasses.replace(u, seconds=seconds) for u in out]
        how = ("layers split over ranks; variants initialized in rounds, on 256-token sequences whatever the quality "
               "context (the library is shared by searches at every context)")
        return stage_use(self.name, how, out, cluster)


def _passes_seconds(s: LibrarySettings, cluster: Cluster, shapes: Shapes, ranges: list[range], rounds: int) -> float:
    """The teacher's calibration pass and every round's validation pass (the teacher and that round's variants),
    batches of :data:`BLD_BATCH` sequences passed rank to rank."""
    from puzzle.search.timing import batches, pipeline, rank_clock

    clock, config, sizes = rank_clock(cluster, shapes.parent), shapes.parent, shapes.layers
    b, m = batches(s.bld_eval_sequences, BLD_BATCH)
    teacher = [clock.blocks([config.blocks[l] for l in r], b, SEQ_LEN) for r in ranges]
    variants = [sum(clock.variant(v, config, b, SEQ_LEN) for l in r for v in sizes[l].trainable) / rounds
                for r in ranges]
    return pipeline(teacher, m) + rounds * pipeline([t + v for t, v in zip(teacher, variants)], m)


def _rank_seconds(s: LibrarySettings, cluster: Cluster, shapes: Shapes, layers: range, disk: float) -> float:
    """A rank's own work: the float64 statistics of its least-squares variants (X^T X, X^T Y) and their solves,
    the FFN channel importance (gate and up again), building every variant's modules, and its writes."""
    from puzzle.search.timing import rank_clock

    clock, sizes, H = rank_clock(cluster, shapes.parent), shapes.layers, shapes.parent.hidden_size
    n = s.bld_eval_sequences * SEQ_LEN
    lsq = sum(sizes[l].lsq_subblocks for l in layers)
    grams = clock.gemm(lsq * 4 * n * H * H + lsq * 8 / 3 * H**3, fp64=True)
    importance = clock.gemm(sum(4 * n * H * sizes[l].ffn_width for l in layers))
    if s.ffn_refit:  # the Gram matrices (m^2 per token) and one (k, k) solve per pruned width
        grams += clock.gemm(sum((2 * n + 2 * sum(v.kind == "swiglu" for v in sizes[l].trainable) * sizes[l].ffn_width)
                                * sizes[l].ffn_width ** 2 for l in layers), fp64=True)
    owned = sum(sizes[l].parent_params + sizes[l].trainable_params for l in layers)
    return grams + importance + clock.modules(owned, "library") + disk / DISK_BYTES_PER_S


STAGE = LibraryStage()
