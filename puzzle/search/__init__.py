"""``puzzle search``: the whole pipeline, stage by stage, into one resumable run directory.

    from puzzle.search import SearchConfig, search
    run = search(SearchConfig(budget="8xH100", speedup=1.5), "runs/smollm2")

Modules: ``config`` (SearchConfig and presets), ``stages`` (manifests, skip/resume), ``pipeline``
(the stage functions and ``search``), ``report`` (parent vs child table and PNG).
"""

from puzzle.search.config import SearchConfig
from puzzle.search.pipeline import STAGES, SearchRun, search

__all__ = ["STAGES", "SearchConfig", "SearchRun", "search"]
