"""``baselines``: the puzzle child against baselines at the same budget (``--baselines``).

    run/baselines/
      influence.csv              block influence of the parent's layers (ShortGPT / attention BI)
      <name>-<sha>/choice.json   the labels the rule picked and whether they meet the budget
      <name>-<sha>/child_bld/    the child_bld stage's training (its losses; resumable)
      <name>-<sha>/gkd/          the gkd stage's distillation (resumable)
      <name>-<sha>/child/        the distilled baseline (runtime checkpoint)
      <name>-<sha>/evaluation.json
      speed.csv                  parent, puzzle child and every baseline timed in one interleaved run
      baselines.csv / .png       the comparison table and plot

A baseline is trained and judged by the same stage objects as the child (child_bld's :meth:`train`,
gkd's :meth:`distill`, evaluate's :meth:`quality`), so it gets the same child-aware BLD, GKD and
evaluation. Each baseline's directory is named by the hash of what it depends on (its labels, the
library, those settings), so a rerun after, say, a new fusion threshold reuses it, and a new budget
(new labels) builds a new one. One process; not in the resource plan.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.search.cluster import Cluster
from puzzle.search.context import StageContext
from puzzle.search.plan import Plan
from puzzle.search.resources import SEQ_LEN, Shapes, StageUse
from puzzle.search.setting import Section
from puzzle.search.stages.base import Stage
from puzzle.search.stages import child_bld, gkd
from puzzle.search.stages.evaluate import STAGE as EVALUATE
from puzzle.search.stages.profile import ProfileSettings, costing_target
from puzzle.search.stages.solve import budget_key, solve_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselinesSettings(Section):
    baselines: tuple[str, ...]
    data: tuple[str, ...]
    fuse_sequences: int
    """Sequences of the block influence (ShortGPT, attention removal)."""
    eval_sequences: int
    measure_speed: bool


class BaselinesStage(Stage):
    name, order = "baselines", 110
    sections = (BaselinesSettings, child_bld.ChildBLDSettings, gkd.GKDSettings, ProfileSettings)
    optional = whole_parent = True

    def enabled(self, plan: Plan) -> bool:
        return bool(BaselinesSettings.of(plan).baselines)

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        # the same budget on the same costs, the same training and evaluation; the puzzle child to time against
        s = BaselinesSettings.of(plan)
        return {"bld": upstream["bld"], "score": upstream["score"], "profile": upstream["profile"],
                "evaluate": upstream["evaluate"], "names": list(s.baselines), **budget_key(plan),
                **child_bld.training_key(plan), **gkd.training_key(plan), "data": list(s.data),
                "sequences": [s.fuse_sequences, s.eval_sequences], "speed": s.measure_speed}

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse | None:
        return None  # one process, after the search; refused under torchrun

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        import pandas as pd

        from puzzle.evaluation import measure_speed
        from puzzle.io import atomic_write_json, atomic_write_text
        from puzzle.loading import load_model
        from puzzle.search.baselines import choose_baseline
        from puzzle.search.manifest import key_sha256
        from puzzle.search.report import predicted_costs

        plan, s, scenarios = ctx.plan, BaselinesSettings.of(ctx.plan), list(ctx.plan.scenarios)
        target = costing_target(plan, ctx.results["profile"].directory)
        problem, influence = solve_problem(ctx, constraints=False), self._influence(ctx, directory)
        parent_pred = predicted_costs(plan.parent_config, target, scenarios)
        puzzle_child = load_model(ctx.out("export", "model"))
        q = json.loads(Path(ctx.out("evaluate", "evaluation")).read_text())["quality"]
        segments = ctx.out("fuse", "segments")
        rows = [_row("parent", ctx.parent, target, scenarios, parent_pred,
                     {"kl": 0.0, "top1_agreement": 1.0, "ppl": q.get("parent_ppl")}, "parent"),
                _row("puzzle", puzzle_child, target, scenarios, parent_pred, q,
                     "MIP" + (f" + fused {', '.join(segments)}" if segments else ""))]
        models = {"parent": ctx.parent, "puzzle": puzzle_child}
        trained = {**child_bld.training_key(plan), **gkd.training_key(plan)}
        # the baseline's own directory: its labels and how it was trained (tokens without the seed, GKD without top-k)
        trained = {**trained, "child_bld": trained["child_bld"][0], "gkd": trained["gkd"][:3]}
        for name in s.baselines:
            choice = choose_baseline(name, problem, influence)
            sha = key_sha256({"labels": list(choice.labels), "bld": ctx.sha("bld"), **trained,
                              "eval": s.eval_sequences, "data": list(s.data)})
            sub = directory / f"{name}-{sha[:10]}"
            sub.mkdir(parents=True, exist_ok=True)
            atomic_write_json(sub / "choice.json", choice.to_dict())
            log.info("baseline %s: %s (predicted speedup %.3f, %s)", name, choice.detail, choice.speedup or 0.0,
                     "meets the budget" if choice.feasible else "INFEASIBLE")
            if not choice.feasible:  # reported, not distilled: it cannot reach the puzzle child's cost
                rows.append({"model": name, "feasible": False, f"pred_{plan.budget_scenario.name}_speedup":
                             choice.speedup, "detail": choice.detail})
                continue
            result = self._build(ctx, choice, sub)
            models[name] = load_model(sub / "child")
            rows.append(_row(name, models[name], target, scenarios, parent_pred, result["quality"], choice.detail))
        df = pd.DataFrame(rows)
        if s.measure_speed:
            speed = measure_speed(models, scenarios, rounds=7, progress=ctx.progress)
            atomic_write_text(directory / "speed.csv", speed.to_csv(index=False))
            for sc in scenarios:
                by = speed[speed.scenario == sc.name].set_index("model")
                df[f"meas_{sc.name}_speedup"] = df["model"].map(by["speedup"])
                df[f"meas_{sc.name}_tokens_per_s"] = df["model"].map(by["tokens_per_s"])
                df[f"pred_{sc.name}_ratio"] = df[f"meas_{sc.name}_speedup"] / df[f"pred_{sc.name}_speedup"]
        atomic_write_text(directory / "baselines.csv", df.to_csv(index=False))
        from puzzle.search.baselines import plot_baselines

        phase = plan.budget_scenario.name
        plot_baselines(df, directory / "baselines.png", f"puzzle vs baselines at the same {phase} budget "
                       f"({plan.budget_text()}), same child-aware BLD ({plan.value('child_bld_tokens')} tokens) and "
                       f"GKD ({plan.value('gkd_steps')} steps)", phase)
        return {"table": str(directory / "baselines.csv"), "plot": str(directory / "baselines.png")}

    def _influence(self, ctx: StageContext, directory: Path) -> Any:
        import pandas as pd

        from puzzle.data.packing import load_sequences
        from puzzle.io import atomic_write_text
        from puzzle.search.baselines import block_influence

        path = directory / "influence.csv"
        if path.is_file():
            return pd.read_csv(path)
        s = BaselinesSettings.of(ctx.plan)
        ids = load_sequences(list(s.data), ctx.tokenizer, seq_len=SEQ_LEN, num_sequences=s.fuse_sequences)
        df = block_influence(ctx.parent, ids)
        atomic_write_text(path, df.to_csv(index=False))
        return df

    def _build(self, ctx: StageContext, choice: Any, sub: Path) -> dict[str, Any]:
        """Assemble one baseline, train it with the child_bld and gkd stages, judge it with the evaluate stage, in
        ``sub``; reuse it if done."""
        from block_library import open_library
        from puzzle.io import atomic_write_json
        from puzzle.loading import save_runtime
        from puzzle.schema import blocks_from_list
        from solvers.labels import block_dict

        done = sub / "evaluation.json"
        if done.is_file():
            return json.loads(done.read_text())
        c, g = child_bld.ChildBLDSettings.of(ctx.plan), gkd.GKDSettings.of(ctx.plan)
        model = open_library(ctx.out("bld", "library")).assemble(blocks_from_list([block_dict(x) for x in choice.labels]))
        trained = (child_bld.STAGE.train(ctx, model, sub / "child_bld").summary() if c.child_bld_tokens > 0
                   else {"tokens": 0})
        distilled: dict[str, Any] = {"steps": g.gkd_steps}
        if g.gkd_steps > 0:
            result = gkd.STAGE.distill(ctx, model, sub / "gkd")  # the child's teacher cache
            model, distilled = result.model, {"steps": g.gkd_steps, "initial": result.initial, "final": result.final}
        save_runtime(model, sub / "child", overwrite=True)
        out = {"quality": EVALUATE.quality(ctx, model), "child_bld": trained, "gkd": distilled}
        atomic_write_json(done, out)
        return out


def _row(name: str, model: Any, target: Any, scenarios: list[Any], parent_pred: dict[str, float],
         quality: dict[str, Any], detail: str) -> dict[str, Any]:
    from puzzle.search.report import predicted_costs

    pred = predicted_costs(model.config, target, scenarios)
    row: dict[str, Any] = {"model": name, "feasible": True, "layers": model.config.num_hidden_layers,
                           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    for sc in scenarios:
        row[f"pred_{sc.name}_speedup"] = parent_pred[f"pred_{sc.name}_ms"] / pred[f"pred_{sc.name}_ms"]
    row.update(kl_to_parent=quality.get("kl", float("nan")), top1_agreement=quality.get("top1_agreement", float("nan")),
               ppl=quality.get("ppl", float("nan")), detail=detail)
    return row


STAGE = BaselinesStage()
