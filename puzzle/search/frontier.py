"""Accuracy-efficiency frontier: one search per speedup target, sharing library, BLD, scores and costs.

    from puzzle.search import SearchConfig
    from puzzle.search.frontier import search_frontier
    df = search_frontier(SearchConfig(budget="cpu", baselines=("uniform_ffn", "shortgpt", "attention_removal")),
                         "runs/frontier", speedups=[1.25, 1.5, 2.0])

    runs/frontier/shared/          library, bld, score, profile (trained and costed once)
    runs/frontier/speedup-1.5/     solve ... evaluate (+ baselines) of that target
    runs/frontier/frontier.csv     one row per (target, model): predicted / measured speedup, KL, top-1

Every search is resumable, so rerunning (say, a notebook) skips what is done and only plots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from puzzle.errors import ConfigError
from puzzle.io import atomic_write_text
from puzzle.search.config import SearchConfig


def _rows_of(run: object) -> pd.DataFrame:
    if run.plan.value("baselines"):  # type: ignore[attr-defined]
        return pd.read_csv(run.stages["baselines"].outputs["table"])  # type: ignore[attr-defined]
    df = run.report.copy()  # type: ignore[attr-defined]
    df["model"] = df["model"].replace({"child": "puzzle"})
    df["feasible"] = True
    return df


def search_frontier(cfg: SearchConfig, run_dir: str | Path, speedups: Sequence[float], *, progress: bool = True,
                    echo: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Search at each speedup target of ``cfg.scenario`` (``cfg``'s other budgets are dropped); the table of
    every model of every target, also written to ``run_dir/frontier.csv``."""
    from puzzle.search.pipeline import search

    if not speedups or any(not x > 0 for x in speedups):
        raise ConfigError(f"speedups must be a non-empty list of positive numbers, got {list(speedups)}")
    run_dir = Path(run_dir)
    frames = []
    for x in speedups:
        c = cfg.without("throughput", "memory").merge({"speedup": float(x)})
        if echo is not None:
            echo(f"== speedup >= {x:g} on {c.budget or 'the default target'} ({c.scenario or 'decode'})")
        run = search(c, run_dir / f"speedup-{x:g}", progress=progress, echo=echo, shared_dir=run_dir / "shared")
        df = _rows_of(run)
        df.insert(0, "target_speedup", float(x))
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    atomic_write_text(run_dir / "frontier.csv", out.to_csv(index=False))
    return out
