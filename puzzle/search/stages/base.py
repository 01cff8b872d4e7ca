"""What a stage of a search is: one object that says what it reads, what its result depends on, what it
costs and how it runs, on one rank or on many.

    class ScoreStage(Stage):
        name, order = "score", 30
        sections = (ScoreSettings,)           # the settings it reads (typed, from the plan)
        shareable = sharded = True            # budget-independent; runs on every rank under torchrun

        def key(self, plan, upstream): ...    # its settings and the output hashes of the stages it reads
        def run(self, ctx, directory): ...    # the work; returns the outputs its manifest records
        def resources(self, plan, cluster, shapes): ...   # memory, disk, time on every rank

The pipeline (:mod:`puzzle.search.pipeline`) only loops over the stages in ``order``; the manifests
(:mod:`puzzle.search.manifest`) skip a stage whose key and files did not change. Because the key and
the run read the same typed section, a setting cannot reach one without the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from puzzle.search.setting import Section

if TYPE_CHECKING:
    from puzzle.search.cluster import Cluster
    from puzzle.search.context import StageContext
    from puzzle.search.plan import Plan
    from puzzle.search.resources import Shapes, StageUse


class Stage:
    """One stage of a search (subclass it in ``puzzle/search/stages/<name>.py`` and set ``STAGE`` there)."""

    name: ClassVar[str]
    order: ClassVar[int]
    """Where it runs in the pipeline: stages run by increasing ``order`` (the built-in ones by tens)."""
    sections: ClassVar[tuple[type[Section], ...]] = ()
    """The settings it reads: its own section first, then any of another stage's it reuses."""
    shareable: ClassVar[bool] = False
    """Independent of the budget: searches at other budgets may share its result (``shared_dir``)."""
    sharded: ClassVar[bool] = False
    """Under ``torchrun`` its run is called on every rank (each does its share); else on rank 0 alone."""
    whole_parent: ClassVar[bool] = False
    """Its run reads the whole parent one process keeps between stages (``ctx.parent``); before any other stage
    that copy is freed, so that the stage's memory (and its measured peak) is its own."""
    optional: ClassVar[bool] = False
    """Runs only when :meth:`enabled` says so (the baselines); the others run in every search."""
    record: ClassVar[tuple[str, ...] | None] = None
    """The files it owns, as globs under its root, where that is not simply ``<name>/**``
    (:func:`puzzle.search.manifest.run_stage`)."""

    def enabled(self, plan: Plan) -> bool:
        """Whether a search with ``plan`` runs this stage."""
        return True

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        """What its result depends on: its settings and ``upstream[stage]``, the output hashes of the stages it
        reads (``upstream["parent"]`` is the parent's fingerprint)."""
        raise NotImplementedError

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        """Do the work in ``directory``; return the outputs to record (figures, and paths under the run)."""
        raise NotImplementedError

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse | None:
        """Its memory, disk and time on every rank of ``cluster``; None: not planned."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<stage {self.name}>"
