"""``score``: replace-1-block scoring, every variant's KL to the parent when it alone replaces its block.

    run/score/scores/scores.csv    one row per (layer, variant): kl, top-1 agreement, ... (the MIP's scores)

Layers split over the ranks under torchrun; a replacement's activations stream through the ranks that
hold the later layers (:mod:`puzzle.scoring.sharded`). Resumes from its finished layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.search.cluster import Cluster
from puzzle.search.context import StageContext, resume_or_restart
from puzzle.search.plan import Plan
from puzzle.search.resources import RankUse, Shapes, StageUse, device_kind, host_bytes, layer_range, stage_use
from puzzle.search.setting import Section
from puzzle.search.stages.base import Stage


@dataclass(frozen=True)
class ScoreSettings(Section):
    data: tuple[str, ...]
    score_sequences: int
    score_seq_len: int


class ScoreStage(Stage):
    name, order = "score", 30
    sections = (ScoreSettings,)
    shareable = sharded = True

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        s = ScoreSettings.of(plan)
        return {"bld": upstream["bld"], "data": list(s.data), "seq_len": s.score_seq_len,
                "sequences": s.score_sequences}

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from puzzle.scoring import ScoreConfig, score_library

        s = ScoreSettings.of(ctx.plan)
        cfg = ScoreConfig(sources=s.data, seq_len=s.score_seq_len, num_sequences=s.score_sequences)
        result = resume_or_restart(score_library, ctx.out("bld", "library"), directory / "scores", cfg,
                                   progress=ctx.progress)
        return {"scores": str(result.directory / "scores.csv"), "rows": len(result.scores)}

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        from block_library.distributed import split_layers
        from puzzle.scoring.memory import score_layer_costs, score_rank_bytes

        s, config, sizes = ScoreSettings.of(plan), shapes.parent, shapes.layers
        V, H = config.vocab_size, config.hidden_size
        world = min(cluster.count, len(sizes))
        ranges = split_layers(score_layer_costs(config), world)
        n, T = s.score_sequences, s.score_seq_len
        seconds = score_seconds(cluster, shapes, ranges, n, T)
        out = []
        for rank, layers in enumerate(ranges):
            peak = score_rank_bytes(config, sizes, layers, first=rank == 0, last=rank == world - 1, sequences=n,
                                    seq_len=T, device=device_kind(cluster))
            staged = 4 * sum(sizes[l].parent_params for l in layers)
            out.append(RankUse(rank, layer_range(layers), peak, host_bytes(cluster, peak, staged), 0.0, seconds))
        how = f"layers split over ranks; replacements stream through the later layers (fp32), on {n} x {T} tokens"
        return stage_use(self.name, how, out, cluster)


SCORE_FIXED_SECONDS = 10.0
"""Reading the library's index, tokenizing, and the parent's pass that caches every layer's streams."""


def score_seconds(cluster: Cluster, shapes: Shapes, ranges: Sequence[range], n: int, T: int) -> float:
    """The parent's pass (with its log-probabilities), then every replacement: its block (an attention variant with
    the parent's FFN), the later layers and the head with the metrics. Layer-sharded, the rank owning the layer runs
    the block and its later layers, each later rank all its layers and the last rank the head of every job: the
    busiest rank bounds the stage."""
    from puzzle.search.timing import VOCAB_LOGSOFTMAX, VOCAB_METRIC, rank_clock, variant_config

    clock, config, sizes = rank_clock(cluster, shapes.parent), shapes.parent, shapes.layers
    blocks = [clock.block(b, n, T) for b in config.blocks]
    head = clock.head(n * (T - 1), VOCAB_METRIC)
    work = [0.0] * len(ranges)
    owner = {l: r for r, rg in enumerate(ranges) for l in rg}
    for l, size in enumerate(sizes):
        parent_ffn = clock.sub("ffn", config.blocks[l].ffn, n, T)
        jobs = [parent_ffn, parent_ffn, 0.0]  # the parent's row and the two no-ops (each still runs the rest)
        jobs += [clock.sub(v.subblock, variant_config(v, config), n, T) + (parent_ffn if v.subblock == "attention"
                                                                         else 0.0) for v in size.trainable]
        r0 = owner[l]
        for job in jobs:
            work[r0] += job + sum(blocks[l + 1:ranges[r0].stop])
            for r in range(r0 + 1, len(ranges)):
                work[r] += sum(blocks[ranges[r].start:ranges[r].stop])
            work[-1] += head
    parent = sum(blocks) + clock.head(n * (T - 1), VOCAB_LOGSOFTMAX)
    return SCORE_FIXED_SECONDS + parent + max(work)


STAGE = ScoreStage()
