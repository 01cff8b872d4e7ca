"""``puzzle.search(...)``: the whole search from Python, with config fields as keyword arguments.

    import puzzle

    run = puzzle.search(run_dir="runs/x", budget="8xH100", speedup=1.5,
                        constraints=["layer[0] == parent", "count(attention != no_op) >= 20"])
    run.export_dir, run.report, run.stages["solve"].outputs["blocks"]

``puzzle.search`` stays the subpackage (``from puzzle.search import SearchConfig, search``); calling
it calls :func:`run_search`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from puzzle.search.config import PRESETS, SearchConfig
from puzzle.search.pipeline import SearchRun, search

_BUDGETS = ("speedup", "throughput", "memory")


def _merge(config: SearchConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """``config``'s fields updated by ``overrides``, undoing what ``config`` only derived from defaults.

    A resolved config holds its preset's stage sizes and the default ``speedup=1.5``; a new
    ``preset`` resets the sizes that still equal the old preset's, and a new throughput or memory
    budget (without a speedup) drops the default speedup, as ``puzzle search`` flags do over a YAML file.
    """
    base = config.to_dict()
    if "preset" in overrides:
        for name, value in PRESETS[config.preset].items():
            if base[name] == value:
                base[name] = None
    if "budget" in overrides:  # fields derived from the old budget follow the new one unless set
        old = SearchConfig(budget=config.budget)
        for name in ("fuse_threshold", "calibrate"):
            if base[name] == getattr(old, name):
                base[name] = None
    budget_given = any(overrides.get(k) is not None for k in ("throughput", "memory"))
    default_speedup = config.throughput is None and config.memory is None and config.speedup == 1.5
    if budget_given and "speedup" not in overrides and default_speedup:
        base["speedup"] = None
    return {**base, **overrides}


def run_search(config: SearchConfig | None = None, run_dir: str | Path = "runs/search", *, progress: bool = True,
               echo: Callable[[str], None] | None = None, **overrides: Any) -> SearchRun:
    """Run (or resume) a search in ``run_dir``; ``overrides`` are :class:`SearchConfig` fields.

    ``config`` defaults to ``SearchConfig()`` (SmolLM2-135M, 8xH100, speedup 1.5, quick preset);
    each keyword overrides one field, e.g. ``budget="cpu"``, ``constraints=["layer[0] == parent"]``.
    An unknown keyword raises :class:`puzzle.errors.ConfigError` naming it. ``echo`` receives one
    line per finished stage (``print`` shows progress); see :func:`puzzle.search.pipeline.search`.
    """
    if config is None:
        cfg = SearchConfig.from_dict(overrides)
    else:
        cfg = SearchConfig.from_dict(_merge(config, overrides)) if overrides else config
    return search(cfg, run_dir, progress=progress, echo=echo)
