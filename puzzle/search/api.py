"""``puzzle.search(...)``: the whole search from Python, with config fields as keyword arguments.

    import puzzle

    run = puzzle.search(run_dir="runs/x", budget="8xH100", speedup=1.5,
                        constraints=["layer[0] == parent", "count(attention != no_op) >= 20"])
    run.export_dir, run.report, run.stages["solve"].outputs["blocks"], run.plan.target

``puzzle.search`` stays the subpackage (``from puzzle.search import SearchConfig, search``); calling
it calls :func:`run_search`. Keywords override ``config`` by the same rule as command-line flags
over a YAML file (:meth:`SearchConfig.merge`): what is set is kept, what is given replaces it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from puzzle.search.config import SearchConfig
from puzzle.search.pipeline import SearchRun, search


def run_search(config: SearchConfig | None = None, run_dir: str | Path = "runs/search", *, progress: bool = True,
               echo: Callable[[str], None] | None = None, verify: bool = False, force: bool = False,
               **overrides: Any) -> SearchRun:
    """Run (or resume) a search in ``run_dir``; ``overrides`` are :class:`SearchConfig` fields.

    ``config`` defaults to ``SearchConfig()`` (SmolLM2-135M, 8xH100, speedup 1.5, quick preset);
    each keyword overrides one field, e.g. ``budget="cpu"``, ``constraints=["layer[0] == parent"]``.
    An unknown keyword raises :class:`puzzle.errors.ConfigError` naming it. ``echo`` receives one
    line per finished stage (``print`` shows progress); see :func:`puzzle.search.pipeline.search`.
    """
    cfg = (config or SearchConfig()).merge(overrides, source="keyword")
    return search(cfg, run_dir, progress=progress, echo=echo, verify=verify, force=force)
