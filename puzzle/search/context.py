"""What every stage of a search receives: the plan, the stage results so far, the shared parent.

    ctx.plan                    the resolved plan (settings, target, scenarios, limits)
    ctx.parent / ctx.tokenizer  loaded once, on first use
    ctx.out("bld", "library")   an output of an earlier stage (paths absolute, inside the run)
    ctx.sha("bld")              the hash of that stage's outputs (what later stages' keys include)
    ctx.world                   the ranks the search runs on (1 outside torchrun)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from puzzle.search.manifest import StageResult
from puzzle.search.plan import Plan

log = logging.getLogger(__name__)


class StageContext:
    """Lazily loaded shared objects (parent, tokenizer) and the stage results so far."""

    def __init__(self, plan: Plan, run_dir: Path, progress: bool, *, group: Any = None,
                 shared_dir: Path | None = None) -> None:
        self.plan, self.run_dir, self.progress = plan, run_dir, progress
        self.results: dict[str, StageResult] = {}
        self._parent: Any = None
        self._tokenizer: Any = None
        self.group: Any = group
        """The process group (:class:`puzzle.search.ranks.Group`) the search runs in; None: one process."""
        self.shared_dir: Path = shared_dir if shared_dir is not None else run_dir
        """Where the budget-independent stages and caches are (a frontier's searches share it)."""

    @property
    def world(self) -> int:
        return self.group.world if self.group is not None else 1

    @property
    def first(self) -> bool:
        """Rank 0 (or the only process): the one that writes the run's shared files."""
        return self.group is None or self.group.first

    @property
    def source(self) -> Any:
        from puzzle.loading import resolve_source

        return resolve_source(self.plan.model)

    @property
    def parent(self) -> Any:
        if self._parent is None:
            from puzzle.loading import load_model

            self._parent = load_model(self.source)
        return self._parent

    def drop_parent(self) -> None:
        """Free the whole parent an earlier stage loaded (one process keeps it between stages); the next
        :attr:`parent` loads it again. The pipeline calls it before every stage not marked ``whole_parent``."""
        self._parent = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from puzzle.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.source)
        return self._tokenizer

    def sha(self, stage: str) -> str:
        """The hash of ``stage``'s recorded outputs: a later stage's key includes it."""
        return self.results[stage].outputs_sha256

    def out(self, stage: str, name: str) -> Any:
        return self.results[stage].outputs[name]


def resume_or_restart(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a resumable stage function; if its directory holds work of other inputs (an earlier key of
    this stage, interrupted), start it over: the stage key, not the old files, decides what is valid."""
    from puzzle.errors import StaleArtifactError

    try:
        return fn(*args, **kwargs)
    except StaleArtifactError as e:
        log.info("%s; starting it over", e)
        return fn(*args, force=True, **kwargs)
