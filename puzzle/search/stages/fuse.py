"""``fuse``: FFN Fusion merges runs of attention-free layers whose FFNs barely depend on each other into one
wide FFN (:mod:`puzzle.fusion`), each fused block locally distilled.

    run/fuse/fusion/model/         the fused child (off: the child goes on as it is)
    run/fuse/fusion/...            segments, dependency scores

Under torchrun every rank fuses the runs in its layers (:mod:`puzzle.fusion.sharded`); in one process
parent, child and fused child are whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.search.cluster import Cluster
from puzzle.search.context import StageContext
from puzzle.search.plan import Plan
from puzzle.search.resources import (SEQ_LEN, RankUse, Shapes, StageUse, base_bytes, device_kind, host_bytes,
                                     layer_range, one_rank, stage_use)
from puzzle.search.setting import Section
from puzzle.search.stages.base import Stage


@dataclass(frozen=True)
class FuseSettings(Section):
    fuse_threshold: float
    fuse_sequences: int
    fuse_distill_steps: int
    data: tuple[str, ...]


AT_256 = ", on 256-token sequences whatever the quality context (fusion merges FFNs, which read no context)"
"""Why fusion calibrates and judges at the library's length."""

class FuseStage(Stage):
    name, order = "fuse", 70
    sections = (FuseSettings,)
    sharded = True
    whole_parent = True

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        s = FuseSettings.of(plan)
        return {"child_bld": upstream["child_bld"], "threshold": s.fuse_threshold, "sequences": s.fuse_sequences,
                "distill": s.fuse_distill_steps, "target": plan.target.to_dict()}

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from puzzle.fusion import FusionConfig

        s, plan = FuseSettings.of(ctx.plan), ctx.plan
        source = ctx.out("child_bld", "model")
        if s.fuse_threshold == 0:  # fusion off: the child goes on as it is
            return {"model": source, "segments": []}
        fcfg = FusionConfig(threshold=max(s.fuse_threshold, 1e-9), sources=s.data, calib_sequences=s.fuse_sequences,
                            eval_sequences=s.fuse_sequences, distill_steps=s.fuse_distill_steps,
                            targets=(plan.target,), dtype=plan.target.dtype, measure=False)
        out = directory / "fusion"
        if ctx.world > 1:  # every rank fuses its layers, read from the child's directory
            from puzzle.fusion.sharded import fuse_sharded

            result = fuse_sharded(source, ctx.tokenizer, fcfg, out, parent=ctx.source.directory, source=plan.model,
                                  tokenizer_dir=ctx.source.directory, overwrite=True, progress=ctx.progress)
        else:
            from puzzle.fusion import fuse_and_report
            from puzzle.fusion.artifact import write_fusion
            from puzzle.loading import load_model

            result = fuse_and_report(load_model(source), ctx.tokenizer, fcfg, parent=ctx.parent, progress=ctx.progress)
            write_fusion(result, out, config=fcfg, source=plan.model, source_dir=ctx.source.directory, overwrite=True)
        return {"model": str(out / "model"), "segments": [seg.label for seg in result.segments]}

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        s, config, sizes = FuseSettings.of(plan), shapes.parent, shapes.layers
        child, P = shapes.child_config, shapes.child_params
        if not s.fuse_threshold > 0:
            return stage_use(self.name, "off (the child goes on as it is)",
                             one_rank(cluster, device=base_bytes(cluster), seconds=0.0), cluster)
        tokens = s.fuse_sequences * SEQ_LEN
        if cluster.count == 1:
            peak = base_bytes(cluster) + 3 * P * 4 + 3 * tokens * config.vocab_size * 4  # parent, child, fused (fp32)
            return stage_use(self.name, "one process: parent, child and fused child whole" + AT_256,
                             one_rank(cluster, device=peak, disk=P * 4, layers=(0, len(sizes)),
                                      seconds=fuse_seconds(s, cluster, shapes, 1)), cluster)
        from block_library.distributed import split_layers
        from puzzle.evaluation.memory import layer_params
        from puzzle.fusion.memory import fuse_layer_costs, fuse_rank_bytes

        world = min(cluster.count, len(sizes))
        ranges, parent_ranges = split_layers(fuse_layer_costs(child), world), split_layers(layer_params(config), world)
        out = []
        for rank, layers in enumerate(ranges):
            peak = fuse_rank_bytes(child, layers, first=rank == 0, last=rank == world - 1,
                                   calib_sequences=s.fuse_sequences, eval_sequences=s.fuse_sequences, seq_len=SEQ_LEN,
                                   parent=config, parent_layers=parent_ranges[rank], distill=s.fuse_distill_steps > 0,
                                   device=device_kind(cluster))
            staged = 4 * sum(sizes[l].parent_params for l in layers)
            out.append(RankUse(rank, layer_range(layers), peak, host_bytes(cluster, peak, staged), P * 4 / world,
                               fuse_seconds(s, cluster, shapes, world)))
        return stage_use(self.name, "layers split over ranks: FFN runs fused where they live" + AT_256, out, cluster)


SEGMENTS = 2
"""Fused segments the plan times (the child is not known yet; the README's child fuses two FFN pairs)."""
FUSE_FIXED_SECONDS = 10.0
"""Copies of the model per segment, writing the fused child and its plot."""


def fuse_seconds(s: FuseSettings, cluster: Cluster, shapes: Shapes, world: int) -> float:
    """The calibration pass, then full passes with the head and the metrics over the held-out sequences (chunks of
    2): the references, the unfused child, each segment fused alone, the fused child before and after its
    distillation; the distillation's steps of each segment's fused FFN (twice as wide) on 2 sequences."""
    from block_library.distributed import split_layers
    from puzzle.evaluation.memory import layer_params
    from puzzle.schema import FFNConfig
    from puzzle.search.timing import KAPPA, VOCAB_METRIC, batches, pipeline, rank_clock

    clock, child = rank_clock(cluster, shapes.parent), shapes.child_config
    b, m = batches(s.fuse_sequences, 2)
    ranges = split_layers(layer_params(child), max(1, min(world, len(child.blocks))))
    forward = pipeline([clock.blocks([child.blocks[l] for l in r], b, SEQ_LEN) for r in ranges], m)
    passes = forward + (9 + SEGMENTS) * (forward + m * clock.head(b * (SEQ_LEN - 1), VOCAB_METRIC))
    widest = max((blk.ffn.intermediate_size for blk in shapes.parent.blocks if blk.ffn.kind == "swiglu"), default=0)
    step = KAPPA * clock.sub("ffn", FFNConfig.swiglu(2 * widest), 2, SEQ_LEN) if widest else 0.0
    return FUSE_FIXED_SECONDS + passes + SEGMENTS * s.fuse_distill_steps * step


STAGE = FuseStage()
