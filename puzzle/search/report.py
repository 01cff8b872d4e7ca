"""The final report of a search: parent vs child, as ``report.csv``, ``report.png`` and a terminal table.

Rows: parent, child. Columns: layers, parameters, the serving engines that load it, weight memory
per device on the target, predicted step time (prefill, decode) and speedup on the target, measured
step time and speedup on this machine (this project's runtime; inside vLLM too when it is installed
and the target is this machine), and quality on held-out text (perplexity, KL to the parent, top-1
agreement) at the quality context and by context: ``ppl_<T>``, ``kl_<T>``, ``top1_<T>`` for 256, the quality
context (the served one by default) and twice it (``report.png`` plots the child's KL against the context).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from puzzle.io import atomic_write_text


def predicted_costs(config: Any, target: Any, scenarios: list[Any]) -> dict[str, float]:
    """Predicted step ms per scenario on ``target`` and weight GiB per device of a model's config."""
    from puzzle.profiler.counts import ModelShape, block_weight_bytes, fixed_weight_bytes
    from puzzle.profiler.roofline import model_ms

    shape = ModelShape.from_config(config)
    blocks = config.blocks
    out = {f"pred_{sc.name}_ms": model_ms(shape, blocks, sc, target) for sc in scenarios}
    weights = fixed_weight_bytes(shape, dtype=target.dtype, tp=target.tp)
    weights += sum(block_weight_bytes(shape, b, dtype=target.dtype, tp=target.tp) for b in blocks)
    out["weight_gib_per_device"] = weights / 2**30
    return out


def report_table(parent: Any, child: Any, target: Any, scenarios: list[Any], evaluation: dict[str, Any]) -> pd.DataFrame:
    """Parent vs child from their configs (no weights read): sizes, the engines that load each (``--engine``
    names), predicted and measured speed, quality."""
    from puzzle.engines import loaders
    from puzzle.summary import totals

    rows = []
    for name, config in (("parent", parent), ("child", child)):
        rows.append({"model": name, "layers": config.num_hidden_layers, "params_m": totals(config).params / 1e6,
                     "engines": " ".join(loaders(config.blocks, config)), **predicted_costs(config, target, scenarios)})
    df = pd.DataFrame(rows).set_index("model")
    for sc in scenarios:
        df[f"pred_{sc.name}_speedup"] = df.loc["parent", f"pred_{sc.name}_ms"] / df[f"pred_{sc.name}_ms"]
    for row in evaluation.get("speed") or []:
        who = "parent" if row["model"] == "parent" else "child"
        df.loc[who, f"meas_{row['scenario']}_ms"] = row["ms"]
    for sc in scenarios:
        col = f"meas_{sc.name}_ms"
        if col in df:
            df[f"meas_{sc.name}_speedup"] = df.loc["parent", col] / df[col]
    for row in evaluation.get("engine_speed") or []:  # timed inside the serving engine (vLLM) on this device
        df.loc["parent", f"{row['engine']}_{row['scenario']}_speedup"] = 1.0
        df.loc["child", f"{row['engine']}_{row['scenario']}_speedup"] = row["engine_speedup"]
    q = evaluation.get("quality", {})
    df.loc["parent", "ppl"] = q.get("parent_ppl", float("nan"))
    df.loc["child", "ppl"] = q.get("ppl", float("nan"))
    df.loc["parent", "kl_to_parent"], df.loc["child", "kl_to_parent"] = 0.0, q.get("kl", float("nan"))
    df.loc["parent", "top1_agreement"], df.loc["child", "top1_agreement"] = 1.0, q.get("top1_agreement", float("nan"))
    from puzzle.evaluation.contexts import from_json

    for c, qc in sorted(from_json(evaluation.get("contexts")).items()):
        df.loc["parent", f"ppl_{c}"], df.loc["child", f"ppl_{c}"] = qc.get("parent_ppl", float("nan")), qc["ppl"]
        df.loc["parent", f"kl_{c}"], df.loc["child", f"kl_{c}"] = 0.0, qc.get("kl", float("nan"))
        df.loc["parent", f"top1_{c}"] = 1.0
        df.loc["child", f"top1_{c}"] = qc.get("top1_agreement", float("nan"))
    return df.reset_index()


def context_columns(df: pd.DataFrame, metric: str) -> dict[int, str]:
    """``{context: column}`` of a report's by-context ``metric`` (``kl``, ``ppl``, ``top1``)."""
    out = {}
    for col in df.columns:
        head, _, tail = col.rpartition("_")
        if head == metric and tail.isdigit():
            out[int(tail)] = col
    return dict(sorted(out.items()))


def plot_report(df: pd.DataFrame, path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone

    panels = [("params_m", "parameters (M)"), ("weight_gib_per_device", "weights / device (GiB)")]
    panels += [(c, c.replace("_", " ")) for c in df.columns if c.endswith("_speedup")]
    panels += [("ppl", "perplexity"), ("kl_to_parent", "KL to parent")]
    panels = [(c, t) for c, t in panels if c in df]
    by_context = context_columns(df, "kl")
    fig = Figure(figsize=(2.3 * (len(panels) + bool(by_context)), 3.0))
    axes = list(fig.subplots(1, len(panels) + bool(by_context), squeeze=False).flat)
    if by_context:  # the child's KL where it is served: it grows with the context
        ax = axes.pop()
        child = df.set_index("model").loc["child"]
        xs, ys = list(by_context), [child[col] for col in by_context.values()]
        ax.plot(xs, ys, "o-", color="#2a7ab0")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_title("child's KL by context (tokens)", fontsize=8)
        ax.tick_params(labelsize=7)
        for x, v in zip(xs, ys):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
    for ax, (col, label) in zip(axes, panels):
        ax.bar(df["model"], df[col], color=["#888888", "#2a7ab0"])
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        for x, v in enumerate(df[col]):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(run: Any, ctx: Any) -> pd.DataFrame:
    from puzzle.loading import load_config
    from puzzle.search.stages.profile import costing_target

    child = load_config(run.stages["export"].outputs["model"])
    evaluation = json.loads(Path(run.stages["evaluate"].outputs["evaluation"]).read_text())
    target = costing_target(run.plan, run.stages["profile"].directory)
    df = report_table(run.plan.parent_config, child, target, list(run.plan.scenarios), evaluation)
    atomic_write_text(run.directory / "report.csv", df.to_csv(index=False))
    plot_report(df, run.directory / "report.png", f"parent vs child on {run.plan.target.name} (predicted) and this "
                f"machine (measured)")
    return df
