"""``search``: the stages of :mod:`puzzle.search.stages`, in order, in one resumable run directory.

    from puzzle.search import SearchConfig, search
    run = search(SearchConfig(budget="8xH100", speedup=1.5), "runs/smollm2")
    run.export_dir          # the deployable DeciLM checkpoint
    run.report              # parent vs child: params, memory, predicted / measured speed, quality

The config is resolved once into a :class:`~puzzle.search.plan.Plan` and checked (model, data,
target, budget feasibility, resources, run directory) before anything is written; ``run_dir/plan.json``
records it. One search writes a run directory at a time (:mod:`puzzle.search.lock`); the parent enters the first
key by its content, so a parent re-trained in place redoes every stage. Every stage lives in ``run_dir/<stage>/``
with a ``stage.json`` manifest (:mod:`puzzle.search.manifest`): a rerun skips stages whose key and recorded files
did not change, an interrupted run resumes, and changing only the budget re-solves without retraining. A
stage's key holds its settings and the hashes of the *outputs* of the stages it reads, so redoing one stage
redoes exactly the ones after it. This module is only the loop: each stage's settings, key, run and resources are in its own file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from puzzle.search.config import SearchConfig
from puzzle.search.context import StageContext
from puzzle.search.lock import check_free, one_writer
from puzzle.search.manifest import StageResult, inspect_stage, run_stage
from puzzle.search.plan import Plan
from puzzle.search.preflight import check_group, prepare, preflight
from puzzle.search.ranks import Group, join
from puzzle.search.resolver import resolve
from puzzle.search.stages import REGISTRY, Stage
from puzzle.search.usage import Usage

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = tuple(s.name for s in REGISTRY.all() if not s.optional)
"""The stages every search runs, in order (``baselines`` runs when asked for)."""
SHAREABLE: tuple[str, ...] = tuple(s.name for s in REGISTRY.all() if s.shareable)
"""Stages that do not depend on the speedup / throughput / memory budget: runs may share them (``shared_dir``)."""


@dataclass
class SearchRun:
    directory: Path
    plan: Plan
    stages: dict[str, StageResult] = field(default_factory=dict)

    @property
    def config(self) -> SearchConfig:
        """What the user said; :attr:`plan` holds every resolved setting."""
        return self.plan.config

    @property
    def export_dir(self) -> Path:
        return Path(self.stages["export"].outputs["model"])

    @property
    def report(self) -> pd.DataFrame:
        return pd.read_csv(self.directory / "report.csv")


def stage_names(plan: Plan) -> tuple[str, ...]:
    """The stages a search with ``plan`` runs, in order."""
    return tuple(s.name for s in REGISTRY.of(plan))


def planned_stages(plan: Plan, run_dir: str | Path, *, shared_dir: str | Path | None = None,
                   verify: bool = False) -> list[dict[str, str]]:
    """What :func:`search` would do in ``run_dir``, stage by stage: ``{"stage", "action": run | skip, "reason"}``.

    Reads manifests and file sizes (hashes with ``verify``, the parent's weights included); writes nothing
    but the parent's hashes into the user cache (:mod:`puzzle.parents.hashes`).
    """
    from block_library.session import parent_fingerprint
    from puzzle.loading import resolve_source

    run_dir = Path(run_dir).expanduser().resolve()
    shared = Path(shared_dir).expanduser().resolve() if shared_dir is not None else run_dir
    upstream = {"parent": parent_fingerprint(resolve_source(plan.model), verify=verify)}
    rows, first_run = [], None
    for stage in REGISTRY.of(plan):
        if first_run is not None:
            rows.append({"stage": stage.name, "action": "run", "reason": f"after {first_run}"})
            continue
        check = inspect_stage(shared if stage.shareable else run_dir, stage.name, stage.key(plan, upstream),
                              record=stage.record, verify=verify)
        rows.append({"stage": stage.name, "action": check.action, "reason": check.reason})
        if check.action == "run":
            first_run = stage.name
        else:
            upstream[stage.name] = str(check.outputs_sha256)
    return rows


def search(config: SearchConfig | Plan, run_dir: str | Path, *, progress: bool = True,
           echo: Callable[[str], None] | None = None, shared_dir: str | Path | None = None,
           verify: bool = False, force: bool = False) -> SearchRun:
    """Run (or resume) every stage of a search in ``run_dir``; see the module docstring.

    ``config``: what the user said (resolved here) or a plan. Everything is checked before the first
    write (:func:`puzzle.search.preflight.preflight`). ``shared_dir``: where the budget-independent
    stages (:data:`SHAREABLE`) live, so runs at different budgets train once (default: ``run_dir``).
    ``verify``: re-hash every recorded file of a stage before skipping it (sizes are always checked), and
    the parent's weights (their cached hashes are not trusted). ``force``: allow a run directory that holds
    other files. Raises :class:`~puzzle.errors.RunInUseError` when another search holds ``run_dir`` (or
    ``shared_dir``), before writing anything.
    """
    from puzzle.peak import frozen_heap

    with frozen_heap():  # each stage's release_memory then scans only what the search itself created
        return _search(config, run_dir, progress=progress, echo=echo, verify=verify, force=force,
                       shared_dir=shared_dir)


def _search(config: SearchConfig | Plan, run_dir: str | Path, *, progress: bool, echo: Callable[[str], None] | None,
            verify: bool, force: bool, shared_dir: str | Path | None) -> SearchRun:
    group = join()
    plan = config if isinstance(config, Plan) else resolve(config)
    check_group(plan, group)
    typed = run_dir
    run_dir = preflight(plan, run_dir, force=force)
    shared = Path(shared_dir).expanduser().resolve() if shared_dir is not None else run_dir
    if shared != run_dir:
        check_free(shared, flag="shared_dir")
        preflight(plan, shared, force=force)
    group.barrier()  # every rank has checked the run directory before rank 0 writes into it
    with one_writer(group, run_dir, shared, typed=typed):
        if group.first:
            prepare(plan, run_dir, shared, shareable=[s.name for s in REGISTRY.of(plan) if s.shareable])
        group.barrier()
        return _run_stages(plan, run_dir, shared, group, progress=progress, echo=echo, verify=verify)


def _run_stages(plan: Plan, run_dir: Path, shared: Path, group: Group, *, progress: bool,
                echo: Callable[[str], None] | None, verify: bool) -> SearchRun:
    """Every stage in order (skipped when up to date), then the report; in a prepared, locked run directory."""
    from block_library.session import parent_fingerprint
    from puzzle.peak import peak_rss_bytes, pin_mmap_threshold, release_memory, reset_peak
    from puzzle.search.report import write_report

    pin_mmap_threshold()  # freed weights leave RSS: each stage's measured peak is its own
    ctx = StageContext(plan, run_dir, progress and group.first, group=group, shared_dir=shared)
    run = SearchRun(directory=run_dir, plan=plan)
    # rank 0 reads the parent's bytes (under verify) once for the group; the others take its answer
    upstream = {"parent": group.broadcast(parent_fingerprint(ctx.source, verify=verify) if group.first else None)}
    usage = Usage(run_dir, group)
    stages = REGISTRY.of(plan)
    for k, stage in enumerate(stages, start=1):
        if not stage.whole_parent:
            ctx.drop_parent()  # an earlier stage's whole parent would count in this stage's peak
        release_memory()
        reset_peak()
        root = shared if stage.shareable else run_dir
        result = _run_on_group(group, ctx, root, stage, stage.key(plan, upstream), verify=verify)
        ctx.results[stage.name] = run.stages[stage.name] = result
        upstream[stage.name] = result.outputs_sha256
        usage.record(ctx, stage.name, result, peak_rss_bytes())
        if echo is not None and group.first:
            echo(f"[{k}/{len(stages)}] {stage.name}: {_what(result)}")
    if group.first:
        write_report(run, ctx)
    group.barrier()
    return run


def _what(result: StageResult) -> str:
    if result.skipped:
        return "up to date, skipped"
    why = result.reason if result.reason and not result.reason.endswith("never completed") else ""
    return f"done in {result.seconds:.0f} s" + (f" ({why})" if why else "")


def _run_on_group(group: Group, ctx: StageContext, root: Path, stage: Stage, key: dict[str, Any], *,
                  verify: bool) -> StageResult:
    """Rank 0 decides and records; a sharded stage's work runs on every rank between two barriers."""
    sharded = group.world > 1 and stage.sharded
    if group.first:
        def work(d: Path) -> dict[str, Any]:
            if not sharded:
                return stage.run(ctx, d)
            group.broadcast(("run", str(d)))  # the other ranks start once the stage directory is ready
            out = stage.run(ctx, d)
            group.barrier()  # every rank's files are written before rank 0 records them
            return out

        result = run_stage(root, stage.name, key, work, record=stage.record, verify=verify)
        if sharded and result.skipped:
            group.broadcast(("skip", None))
    elif sharded:
        action, d = group.broadcast(None)
        if action == "run":
            stage.run(ctx, Path(d))
            group.barrier()
    return group.broadcast(result if group.first else None)
