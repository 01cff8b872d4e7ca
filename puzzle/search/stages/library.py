"""``library``: every variant of every layer, initialized from the parent (:mod:`block_library`).

    run/library/lib/               the variants' weights, index and manifest (BLD trains them in place)

Layers split over the ranks under torchrun; each rank initializes its variants in rounds that fit
its memory. The library's settings (search space, data, BLD sizes, seed) are one
:class:`block_library.LibraryConfig` that the ``bld`` stage reads as well.
"""

from __future__ import annotations

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
        db, out = cluster.dtype_bytes, []
        calib_tokens = val_tokens = s.bld_eval_sequences * SEQ_LEN
        for rank, layers in enumerate(layer_ranges(sizes, cluster.count)):
            first = rank == 0
            fixed = build_fixed_bytes(config, sizes, layers, first=first, batch=BLD_BATCH, seq_len=SEQ_LEN,
                                      dtype_bytes=db, device="cpu" if cluster.is_cpu else "gpu", ffn_refit=s.ffn_refit)
            rounds = round_params(round_items(sizes, layers), cluster.memory_per_rank - fixed, INIT_BYTES_PER_PARAM)
            teacher = sum(sizes[l].parent_params for l in layers)
            variants = sum(sizes[l].trainable_params for l in layers)
            flops = 2 * teacher * calib_tokens + len(rounds) * 2 * teacher * val_tokens + 2 * variants * val_tokens
            flops += sum(sizes[l].lsq_subblocks for l in layers) * 2 * config.hidden_size ** 3  # the solves
            if s.ffn_refit:  # the Gram matrices (m^2 per token) and one (k, k) solve per pruned width
                pruned = [(l, sum(v.kind == "swiglu" for v in sizes[l].trainable)) for l in layers]
                flops += sum((2 * calib_tokens + 2 * n * sizes[l].ffn_width) * sizes[l].ffn_width ** 2
                             for l, n in pruned)
            disk = INIT_BYTES_PER_PARAM * variants + (INIT_BYTES_PER_PARAM * embedding_params(config) if first else 0)
            peak = fixed + INIT_BYTES_PER_PARAM * max(rounds)
            gram = gram_bytes(sizes, layers, ffn_refit=s.ffn_refit)  # host memory; in ``fixed`` on a CPU
            out.append(RankUse(rank, layer_range(layers), peak, host_bytes(cluster, peak, 4 * teacher + gram), disk,
                               flops / cluster.flops_per_rank + disk / DISK_BYTES_PER_S, len(rounds)))
        return stage_use(self.name, "layers split over ranks; variants initialized in rounds", out, cluster)


STAGE = LibraryStage()
