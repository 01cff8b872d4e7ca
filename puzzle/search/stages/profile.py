"""``profile``: the cost of every variant on the deployment target, in the plan's serving scenarios.

    run/profile/costs.csv          per (layer, variant): step ms per scenario, weight and KV bytes
    run/profile/calibration.json   on a calibrated target (cpu): this machine's fitted efficiencies

Rank 0 alone. On the CPU it times a few blocks and fits the roofline first (``calibrate``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.search.cluster import Cluster
from puzzle.search.context import StageContext
from puzzle.search.plan import Plan
from puzzle.search.resources import Shapes, StageUse, base_bytes, one_rank, stage_use
from puzzle.search.setting import Section
from puzzle.search.stages.base import Stage


@dataclass(frozen=True)
class ProfileSettings(Section):
    calibrate: bool


def costing_target(plan: Plan, profile_dir: Path) -> Any:
    """The plan's target, with this machine's fitted efficiencies when the plan calibrates (what the profile
    stage costed with; the evaluation and the baselines cost their children the same way)."""
    from puzzle.profiler.calibrate import calibrate_target

    path = Path(profile_dir) / "calibration.json"
    if ProfileSettings.of(plan).calibrate and path.is_file():
        return calibrate_target(plan.target, None, (), (), measure=False, calibration=path)
    return plan.target


class ProfileStage(Stage):
    name, order = "profile", 40
    sections = (ProfileSettings,)
    shareable = True

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        return {"library": upstream["library"], "target": plan.target.to_dict(),
                "calibrate": ProfileSettings.of(plan).calibrate, "scenarios": [sc.to_dict() for sc in plan.scenarios]}

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from puzzle.io import atomic_write_text
        from puzzle.profiler.calibrate import calibrate_target
        from puzzle.profiler.counts import ModelShape
        from puzzle.profiler.table import cost_table, layer_candidates, model_totals

        plan, target, calibrate = ctx.plan, ctx.plan.target, ProfileSettings.of(ctx.plan).calibrate
        config, candidates = layer_candidates(ctx.out("bld", "library"))
        shape = ModelShape.from_config(config)
        if calibrate:  # time this machine's variants in the run's scenarios; the fit lands in the stage directory
            target = calibrate_target(target, shape, candidates, list(plan.scenarios), measure=True,
                                      calibration=directory / "calibration.json")
        table = cost_table(shape, candidates, config.blocks, target=target, scenarios=list(plan.scenarios))
        atomic_write_text(directory / "costs.csv", table.to_csv(index=False))
        return {"costs": str(directory / "costs.csv"), "target": target.name, "calibrated": bool(calibrate),
                "parent": model_totals(table, config.blocks, list(plan.scenarios))}

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        calibrate = ProfileSettings.of(plan).calibrate
        seconds = calibrate_seconds(plan, cluster, shapes) if calibrate else 1.0  # else the analytic table
        b = base_bytes(cluster) + (max(s.parent_params for s in shapes.layers) * 4 if calibrate else 0)
        return stage_use(self.name, "rank 0: the cost table", one_rank(cluster, device=b, seconds=seconds), cluster)


FIT_SECONDS = 5.0
"""The grid fit of the efficiencies to the timings."""


def calibrate_seconds(plan: Plan, cluster: Cluster, shapes: Shapes) -> float:
    """Timing every distinct attention and FFN of the library in every scenario: each one built in as many copies
    as fill :data:`~puzzle.profiler.measure.STREAM_BYTES` (so that the timed steps stream their weights from memory,
    as serving does), 10 repeats after 2 warm-ups of all copies at the roofline's time for this CPU; then the fit.
    On GPUs a minute."""
    from puzzle.profiler.calibrate import sub_blocks
    from puzzle.profiler.counts import ModelShape, block_params
    from puzzle.profiler.measure import MAX_COPIES, STREAM_BYTES
    from puzzle.profiler.roofline import block_ms
    from puzzle.schema import BlockConfig
    from puzzle.search.timing import rank_clock, variant_config

    clock, config = rank_clock(cluster, shapes.parent), shapes.parent
    if clock.target is None:
        return 60.0
    candidates = [[config.blocks[l]] + [BlockConfig(attention=variant_config(v, config), ffn=config.blocks[l].ffn)
                                        if v.subblock == "attention" else
                                        BlockConfig(attention=config.blocks[l].attention, ffn=variant_config(v, config))
                                        for v in size.trainable] for l, size in enumerate(shapes.layers)]
    shape, seconds = ModelShape.from_config(config), FIT_SECONDS
    for sc in plan.scenarios:
        for b in sub_blocks(candidates):
            params = block_params(shape, b)
            cache = 2 * sc.batch * b.attention.num_key_value_heads * sc.length * config.head_dim \
                if b.attention.kind == "gqa" and sc.phase == "decode" else 0
            copies = max(1, min(MAX_COPIES, -(-STREAM_BYTES // max(1, 4 * (params + cache)))))
            seconds += copies * (12 * block_ms(shape, b, sc, clock.target) / 1e3 + clock.modules(params, "library"))
    return seconds


STAGE = ProfileStage()
