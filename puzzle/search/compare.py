"""The ``baselines`` stage of a search: the puzzle child against baselines at the same budget.

    run/baselines/
      influence.csv              block influence of the parent's layers (ShortGPT / attention BI)
      <name>-<sha>/choice.json   the labels the rule picked and whether they meet the budget
      <name>-<sha>/child_bld/    the same child-aware BLD as the puzzle child (its losses; resumable)
      <name>-<sha>/gkd/          the same global distillation as the puzzle child (resumable)
      <name>-<sha>/child/        the distilled baseline (runtime checkpoint)
      <name>-<sha>/evaluation.json
      speed.csv                  parent, puzzle child and every baseline timed in one interleaved run
      baselines.csv / .png       the comparison table and plot

Each baseline's directory is named by the hash of what it depends on (its labels, the library,
GKD and evaluation settings), so a rerun after, say, a new fusion threshold reuses it, and a
new budget (new labels) builds a new one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from puzzle.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def _influence(ctx: Any, d: Path) -> pd.DataFrame:
    from puzzle.data.packing import load_sequences
    from puzzle.search.baselines import block_influence

    path = d / "influence.csv"
    if path.is_file():
        return pd.read_csv(path)
    ids = load_sequences(list(ctx.plan.data), ctx.tokenizer, seq_len=256, num_sequences=ctx.plan.fuse_sequences)
    df = block_influence(ctx.parent, ids)
    atomic_write_text(path, df.to_csv(index=False))
    return df


def _build_baseline(ctx: Any, choice: Any, sub: Path) -> dict[str, Any]:
    """Assemble, train and distill (as the puzzle child was: child-aware BLD, then GKD) and evaluate one baseline
    in ``sub``; reuse it if done."""
    from block_library import open_library
    from puzzle.distill import GKDConfig, distill_child
    from puzzle.evaluation import evaluate
    from puzzle.loading import save_runtime
    from puzzle.schema import blocks_from_list
    from puzzle.search.context import child_bld, gkd_teacher, resume_or_restart
    from solvers.labels import block_dict

    done = sub / "evaluation.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = ctx.plan
    child = open_library(ctx.out("bld", "library")).assemble(blocks_from_list([block_dict(x) for x in choice.labels]))
    trained = child_bld(ctx, child, sub / "child_bld").summary() if cfg.child_bld_tokens > 0 else {"tokens": 0}
    gkd: dict[str, Any] = {"steps": cfg.gkd_steps}
    if cfg.gkd_steps > 0:
        gcfg = GKDConfig(sources=cfg.data, steps=cfg.gkd_steps, batch=cfg.gkd_batch, seed=cfg.seed)
        result = resume_or_restart(distill_child, child, ctx.parent, ctx.tokenizer, sub / "gkd", gcfg,
                                    progress=ctx.progress, teacher=gkd_teacher(ctx, gcfg))  # the child's cache
        child, gkd = result.model, {"steps": cfg.gkd_steps, "initial": result.initial, "final": result.final}
    save_runtime(child, sub / "child", overwrite=True)
    ev = evaluate(child, ctx.tokenizer, parent=ctx.parent, sources=cfg.data, num_sequences=cfg.eval_sequences)
    out = {"quality": ev.quality, "child_bld": trained, "gkd": gkd}
    atomic_write_json(done, out)
    return out


def _row(name: str, model: Any, target: Any, scenarios: list[Any], parent_pred: dict[str, float],
         quality: dict[str, Any], feasible: bool, detail: str) -> dict[str, Any]:
    from puzzle.search.report import predicted_costs

    pred = predicted_costs(model.config, target, scenarios)
    row: dict[str, Any] = {"model": name, "feasible": feasible, "layers": model.config.num_hidden_layers,
                           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    for sc in scenarios:
        row[f"pred_{sc.name}_speedup"] = parent_pred[f"pred_{sc.name}_ms"] / pred[f"pred_{sc.name}_ms"]
    row.update(kl_to_parent=quality.get("kl", float("nan")), top1_agreement=quality.get("top1_agreement", float("nan")),
               ppl=quality.get("ppl", float("nan")), detail=detail)
    return row


def stage_baselines(ctx: Any, d: Path) -> dict[str, Any]:
    from puzzle.evaluation import measure_speed
    from puzzle.loading import load_model
    from puzzle.search.baselines import choose_baseline
    from puzzle.search.context import child_refit_key, costing_target, solve_problem
    from puzzle.search.report import predicted_costs
    from puzzle.search.stages import key_sha256

    cfg, scenarios = ctx.plan, list(ctx.plan.scenarios)
    target = costing_target(cfg, ctx.results["profile"].directory)
    problem, influence = solve_problem(ctx, constraints=False), _influence(ctx, d)
    parent_pred = predicted_costs(ctx.plan.parent_config, target, scenarios)
    puzzle_child = load_model(ctx.out("export", "model"))
    evaluation = json.loads(Path(ctx.out("evaluate", "evaluation")).read_text())
    q = evaluation["quality"]
    rows = [_row("parent", ctx.parent, target, scenarios, parent_pred, {"kl": 0.0, "top1_agreement": 1.0,
                                                                           "ppl": q.get("parent_ppl")}, True, "parent"),
            _row("puzzle", puzzle_child, target, scenarios, parent_pred, q, True,
                 "MIP" + (f" + fused {', '.join(segs)}" if (segs := ctx.out("fuse", "segments")) else ""))]
    models = {"parent": ctx.parent, "puzzle": puzzle_child}
    for name in cfg.baselines:
        choice = choose_baseline(name, problem, influence)
        sha = key_sha256({"labels": list(choice.labels), "bld": ctx.sha("bld"), "child_bld": cfg.child_bld_tokens,
                          **child_refit_key(cfg), "gkd": [cfg.gkd_steps, cfg.gkd_batch, cfg.seed], "eval": cfg.eval_sequences,
                          "data": list(cfg.data)})
        sub = d / f"{name}-{sha[:10]}"
        sub.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sub / "choice.json", choice.to_dict())
        log.info("baseline %s: %s (predicted speedup %.3f, %s)", name, choice.detail, choice.speedup or 0.0,
                 "meets the budget" if choice.feasible else "INFEASIBLE")
        if not choice.feasible:  # reported, not distilled: it cannot reach the puzzle child's cost
            rows.append({"model": name, "feasible": False, f"pred_{cfg.scenario}_speedup": choice.speedup,
                         "detail": choice.detail})
            continue
        result = _build_baseline(ctx, choice, sub)
        models[name] = load_model(sub / "child")
        rows.append(_row(name, models[name], target, scenarios, parent_pred, result["quality"], True, choice.detail))
    df = pd.DataFrame(rows)
    if cfg.measure_speed:
        speed = measure_speed(models, scenarios, rounds=7, progress=ctx.progress)
        atomic_write_text(d / "speed.csv", speed.to_csv(index=False))
        for sc in scenarios:
            s = speed[speed.scenario == sc.name].set_index("model")
            df[f"meas_{sc.name}_speedup"] = df["model"].map(s["speedup"])
            df[f"meas_{sc.name}_tokens_per_s"] = df["model"].map(s["tokens_per_s"])
            df[f"pred_{sc.name}_ratio"] = df[f"meas_{sc.name}_speedup"] / df[f"pred_{sc.name}_speedup"]
    atomic_write_text(d / "baselines.csv", df.to_csv(index=False))
    budget = ", ".join(f"{name} {v:g}" for name, v in (("speedup >=", cfg.speedup), ("tokens/s >=", cfg.throughput),
                                                         ("GiB <=", cfg.memory)) if v is not None)
    plot_baselines(df, d / "baselines.png", f"puzzle vs baselines at the same {cfg.scenario} budget ({budget}) on "
                   f"{cfg.target.name}, same child-aware BLD ({cfg.child_bld_tokens} tokens) and GKD "
                   f"({cfg.gkd_steps} steps)", cfg.scenario)
    return {"table": str(d / "baselines.csv"), "plot": str(d / "baselines.png")}


def plot_baselines(df: pd.DataFrame, path: Path, title: str, scenario: str) -> None:
    """KL to the parent against predicted (and, when measured, measured) speedup, one point per model."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone

    cols = [c for c in (f"pred_{scenario}_speedup", f"meas_{scenario}_speedup") if c in df]
    fig = Figure(figsize=(4.2 * len(cols), 3.4))
    axes = fig.subplots(1, len(cols), squeeze=False)
    ok = df[df["feasible"].astype(bool) & df["kl_to_parent"].notna()] if "kl_to_parent" in df else df.iloc[:0]
    ok = ok[ok["model"] != "parent"]
    for ax, col in zip(axes[0], cols):
        for _, r in ok.iterrows():
            ax.scatter(r[col], r["kl_to_parent"], s=40, marker="*" if r["model"] == "puzzle" else "o")
            ax.annotate(r["model"], (r[col], r["kl_to_parent"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(col.replace("_", " "))
        ax.set_ylabel("KL to parent (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
