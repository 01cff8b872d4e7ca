"""A frontier as a PNG: quality loss against the target (matplotlib, imported only here)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

UNITS = {"throughput": "tokens/s", "speedup": "x", "memory": "GiB", "latency": "ms", "params": "parameters"}
ACHIEVED = {"throughput": "throughput", "speedup": "speedup", "memory": "memory_gib", "latency": "step_ms",
            "params": "params"}


def plot_frontier(table: pd.DataFrame, path: str | os.PathLike, *, axis: str = "throughput",
                  score_column: str = "score") -> Path:
    """Plot ``objective`` against ``target`` for the feasible rows, each optimum at the value it
    actually achieves (hollow markers: the Pareto points), and infeasible targets as red crosses."""
    try:
        from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone
    except ImportError as e:
        raise ModuleNotFoundError("the frontier plot needs matplotlib: pip install matplotlib") from e
    x_scale = 1 / 2**30 if axis == "memory" else 1.0
    ok = table[table["status"] != "infeasible"]
    bad = table[table["status"] == "infeasible"]
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.subplots()
    ax.plot(ok["target"] * x_scale, ok["objective"], "o-", label="optimum for the target")
    ax.plot(ok[ACHIEVED[axis]], ok["objective"], "o", mfc="none", color="tab:green", label="what it achieves")
    if len(bad):
        ax.plot(bad["target"] * x_scale, [ok["objective"].min() if len(ok) else 0.0] * len(bad), "x",
                color="tab:red", label="infeasible")
    ax.set_xlabel(f"{axis} ({UNITS[axis]})")
    ax.set_ylabel(f"summed {score_column} (lower is better)")
    ax.set_title(f"Puzzle frontier: {score_column} vs {axis}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path
