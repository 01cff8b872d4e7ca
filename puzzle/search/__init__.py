"""``puzzle search``: the whole pipeline, stage by stage, into one resumable run directory.

    import puzzle
    run = puzzle.search(run_dir="runs/smollm2", budget="8xH100", speedup=1.5,
                        constraints=["layer[0] == parent"])        # config fields as keywords

    from puzzle.search import SearchConfig, search               # the same with a config object
    run = search(SearchConfig(budget="8xH100", speedup=1.5), "runs/smollm2")

This subpackage is callable: ``puzzle.search(config=None, run_dir="runs/search", *, progress=True,
echo=None, **overrides)`` is :func:`puzzle.search.api.run_search`; attribute access works as for
any module. ``STAGES`` names the stages every search runs, in order; ``REGISTRY[name]`` is the stage
object (its settings section, key, run, resources), one file each in ``puzzle/search/stages/``.

Modules: ``settings`` (the table: every setting declared once), ``setting`` (a row, its check, typed
sections), ``config`` (SearchConfig: what the user said), ``resolver`` (``resolve(config) -> Plan``: every
default, the target, the scenarios, feasibility, resources), ``plan`` (the Plan), ``resources`` and
``resource_plan`` (memory, disk, time per stage and rank), ``preflight`` (checks before any write),
``manifest`` (skip/resume/verify), ``context`` (what stages share), ``stages/`` (one file per stage),
``pipeline`` (the loop), ``usage`` (resources.csv), ``api`` (``run_search``), ``report`` (parent vs child).
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from puzzle.search.config import SearchConfig
    from puzzle.search.pipeline import SearchRun

_LAZY = {"run_search": "api", "SearchConfig": "config", "STAGES": "pipeline", "SearchRun": "pipeline",
         "planned_stages": "pipeline", "search": "pipeline", "Plan": "plan", "resolve": "resolver",
         "REGISTRY": "stages"}
"""Names handed out on first use, so that reading the settings (``puzzle --help``) does not load torch."""

__all__ = ["REGISTRY", "STAGES", "Plan", "SearchConfig", "SearchRun", "planned_stages", "resolve", "run_search",
           "search"]


class _CallableModule(types.ModuleType):
    """This module, made callable: ``puzzle.search(...)`` runs :func:`run_search`."""

    def __call__(self, config: SearchConfig | None = None, run_dir: str | Path = "runs/search",
                 **kwargs: Any) -> SearchRun:
        from puzzle.search.api import run_search

        return run_search(config, run_dir, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in _LAZY:
            value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
            setattr(self, name, value)
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _call_doc() -> str:
    return """Run (or resume) a search: ``puzzle.search(config=None, run_dir="runs/search", *, progress=True,
    echo=None, verify=False, force=False, **overrides)``; ``overrides`` are :class:`SearchConfig` settings
    (see :func:`puzzle.search.api.run_search`)."""


_CallableModule.__call__.__doc__ = _call_doc()
sys.modules[__name__].__class__ = _CallableModule
