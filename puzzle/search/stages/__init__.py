"""The stages of a search, one file each: ``puzzle/search/stages/<name>.py`` defines ``STAGE``.

    from puzzle.search.stages import REGISTRY
    [s.name for s in REGISTRY.all()]    # library, bld, score, profile, solve, child_bld, fuse, gkd, export,
                                        # evaluate, baselines
    REGISTRY["gkd"].key(plan, upstream)

Every module of this package that defines ``STAGE`` (a :class:`~puzzle.search.stages.base.Stage`) is a
stage; they run by their ``order``. A new stage is a new file here; :meth:`Registry.temporary` adds one
for the length of a ``with`` block (tests).
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

from puzzle.search.stages.base import Stage

__all__ = ["REGISTRY", "Registry", "Stage"]


class Registry:
    """The stages, found in this package on first use, in ``order``."""

    def __init__(self) -> None:
        self._found: dict[str, Stage] | None = None
        self._added: dict[str, Stage] = {}

    def _discover(self) -> dict[str, Stage]:
        if self._found is None:
            found: dict[str, Stage] = {}
            for info in pkgutil.iter_modules(__path__):
                if info.name == "base":
                    continue
                stage = getattr(importlib.import_module(f"{__name__}.{info.name}"), "STAGE", None)
                if isinstance(stage, Stage):
                    found[stage.name] = stage
            self._found = found
        return self._found

    def all(self) -> tuple[Stage, ...]:
        stages = {**self._discover(), **self._added}
        return tuple(sorted(stages.values(), key=lambda s: (s.order, s.name)))

    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.all())

    def of(self, plan: Any) -> tuple[Stage, ...]:
        """The stages a search with ``plan`` runs, in order."""
        return tuple(s for s in self.all() if not s.optional or s.enabled(plan))

    def __getitem__(self, name: str) -> Stage:
        for s in self.all():
            if s.name == name:
                return s
        raise KeyError(f"no stage {name!r}; the stages are {list(self.names())}")

    @contextlib.contextmanager
    def temporary(self, *stages: Stage) -> Iterator[Registry]:
        """These stages beside the package's, until the block ends."""
        taken = [s.name for s in stages if s.name in self._discover() or s.name in self._added]
        if taken:
            raise ValueError(f"stage names already taken: {taken}")
        self._added.update({s.name: s for s in stages})
        try:
            yield self
        finally:
            for s in stages:
                self._added.pop(s.name, None)


REGISTRY = Registry()
