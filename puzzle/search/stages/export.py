"""``export``: the child as a DeciLM / nemotron-nas checkpoint that vLLM and transformers load
(:mod:`puzzle.export`).

    run/export/model/              config.json with block_configs, safetensors, tokenizer, DeciLM code

Rank 0, tensor by tensor: the child is never whole in memory. Refused when the serving engine cannot
load the child (the MIP kept to the engine's rules, so this is a check).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.search.cluster import DISK_BYTES_PER_S, Cluster
from puzzle.search.context import StageContext
from puzzle.search.plan import Plan
from puzzle.search.resources import Shapes, StageUse, base_bytes, one_rank, stage_use
from puzzle.search.setting import Section
from puzzle.search.stages.base import Stage


@dataclass(frozen=True)
class ExportSettings(Section):
    engine: str


class ExportStage(Stage):
    name, order = "export", 90
    sections = (ExportSettings,)

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        return {"gkd": upstream["gkd"]}  # the engine only checks: the MIP's choice (in the upstream hash) obeyed it

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from puzzle.engines import check_loadable, engine_rules, loaders
        from puzzle.export import export_decilm_dir
        from puzzle.loading import load_config

        child = load_config(ctx.out("gkd", "model"))
        check_loadable(engine_rules(ExportSettings.of(ctx.plan).engine), child.blocks, child, what="the child")
        # tensor by tensor: the child is never whole in memory
        export_decilm_dir(ctx.out("gkd", "model"), directory / "model", source_dir=ctx.source.directory, overwrite=True)
        return {"model": str(directory / "model"), "layers": child.num_hidden_layers,
                "engines": loaders(child.blocks, child)}

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        from puzzle.export.memory import export_peak_bytes

        P = shapes.child_params
        peak = export_peak_bytes(shapes.child_config)
        return stage_use(self.name, "rank 0: the child copied tensor by tensor into DeciLM files",
                         one_rank(cluster, device=peak if cluster.is_cpu else base_bytes(cluster), host=peak,
                                  disk=P * 4, seconds=2 * P * 4 / DISK_BYTES_PER_S), cluster)


STAGE = ExportStage()
