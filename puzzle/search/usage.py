"""``resources.csv``: per stage and rank, the plan's predicted peak memory and time beside the measured ones.

    stage,rank,skipped,predicted_peak_gib,measured_peak_gib,predicted_s,measured_s,rounds

The stages after the MIP are planned again for the child it chose (the upfront plan assumes the largest
child, the parent). A stage skipped in this run keeps an earlier run's rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from puzzle.io import atomic_write_text
from puzzle.search.context import StageContext
from puzzle.search.manifest import StageResult

USAGE_FILE = "resources.csv"


class Usage:
    """The run's resources table, rewritten (on rank 0) after every stage."""

    def __init__(self, run_dir: Path, group: Any) -> None:
        self.path, self.group = run_dir / USAGE_FILE, group
        self.rows: list[dict[str, Any]] = []
        # read when the search starts: the rows of the stages this run skips
        self.earlier = pd.read_csv(self.path) if self.path.is_file() else pd.DataFrame(columns=["stage"])

    def record(self, ctx: StageContext, stage: str, result: StageResult, peak: int) -> None:
        """Every rank's measured peak RSS (``peak``, gathered here) and the stage's wall time, beside the plan."""
        rows = self.group.gather((self.group.rank, peak))
        if not self.group.first or rows is None:
            return
        self.rows += _rows(ctx, stage, result, rows)
        parts = []
        for name in dict.fromkeys(u["stage"] for u in self.rows):
            now = pd.DataFrame([u for u in self.rows if u["stage"] == name])
            before = self.earlier[self.earlier.stage == name]
            parts.append(before if now.skipped.all() and len(before) else now)
        atomic_write_text(self.path, pd.concat(parts).to_csv(index=False))


def chosen_child(ctx: StageContext, stage: str) -> Any:
    """The child a stage after the MIP works on (its config): the MIP's for fusion, the fused one after."""
    from puzzle.loading import load_config
    from puzzle.schema import load_blocks

    if stage in ("child_bld", "fuse") and "solve" in ctx.results:
        return ctx.plan.parent_config.with_blocks(load_blocks(ctx.out("solve", "blocks")))
    if stage in ("gkd", "export", "evaluate") and "fuse" in ctx.results:
        return load_config(ctx.out("fuse", "model"))
    return None


def _rows(ctx: StageContext, stage: str, result: StageResult, measured: list[tuple[int, int]]) -> list[dict[str, Any]]:
    from puzzle.search.resource_plan import plan_resources

    plan, child = ctx.plan, chosen_child(ctx, stage)
    resources = plan.resources if child is None else plan_resources(plan, child=child, search=False)
    use = resources.stage(stage) if resources is not None and stage in resources.stage_names else None
    out = []
    for rank, peak in measured:
        r = use.ranks[rank] if use is not None and rank < len(use.ranks) else None
        out.append({"stage": stage, "rank": rank, "skipped": result.skipped,
                    "predicted_peak_gib": r.device_bytes / 2**30 if r else float("nan"),
                    "measured_peak_gib": peak / 2**30,
                    "predicted_s": r.seconds if r else float("nan"), "measured_s": result.seconds,
                    "rounds": r.rounds if r else 1})
    return out
