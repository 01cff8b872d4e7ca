"""``puzzle search``: the whole pipeline, stage by stage, into one resumable run directory.

    import puzzle
    run = puzzle.search(run_dir="runs/smollm2", budget="8xH100", speedup=1.5,
                        constraints=["layer[0] == parent"])        # config fields as keywords

    from puzzle.search import SearchConfig, search               # the same with a config object
    run = search(SearchConfig(budget="8xH100", speedup=1.5), "runs/smollm2")

This subpackage is callable: ``puzzle.search(config=None, run_dir="runs/search", *, progress=True,
echo=None, **overrides)`` is :func:`puzzle.search.api.run_search`; attribute access works as for
any module. The stages, for running or replacing one at a time: ``STAGES`` (their order) and
``STAGE_FUNCTIONS`` (name -> ``stage_<name>(ctx, directory) -> outputs``, also reachable as
``puzzle.search.pipeline.stage_library``, ``stage_bld``, ... ``stage_evaluate``).

Modules: ``config`` (SearchConfig: what the user said, and presets), ``plan`` (``resolve(config) -> Plan``:
every default, the target, the scenarios, feasibility), ``preflight`` (checks before any write),
``stages`` (manifests, skip/resume/verify), ``context`` (what stages share), ``pipeline`` (the stage
functions and ``search``), ``api`` (``run_search``), ``report`` (parent vs child table and PNG).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

from puzzle.search.api import run_search
from puzzle.search.config import SearchConfig
from puzzle.search.pipeline import STAGE_FUNCTIONS, STAGES, SearchRun, planned_stages, search
from puzzle.search.plan import Plan, resolve

__all__ = ["STAGES", "STAGE_FUNCTIONS", "Plan", "SearchConfig", "SearchRun", "planned_stages", "resolve", "run_search",
           "search"]


class _CallableModule(types.ModuleType):
    """This module, made callable: ``puzzle.search(...)`` runs :func:`run_search`."""

    def __call__(self, config: SearchConfig | None = None, run_dir: str | Path = "runs/search",
                 **kwargs: Any) -> SearchRun:
        return run_search(config, run_dir, **kwargs)

    __call__.__doc__ = run_search.__doc__


sys.modules[__name__].__class__ = _CallableModule
