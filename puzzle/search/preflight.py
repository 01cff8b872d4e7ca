"""Preflight: everything a search can check before it does any work or writes any file.

The model's config and the target are read by :func:`puzzle.search.resolver.resolve`; here the
model's weights (present, safetensors), the data sources, the budget's feasibility, the resource
plan (every stage fits the cluster's memory per rank) and the run directory are checked. Every refusal is a typed one-line
error (the CLI prints it and exits 2). A run directory must be

* named (not ``""``), and not an existing file;
* outside the parent's directory, the embedded-parent cache and any model directory (a folder
  holding ``config.json``): puzzle never writes next to weights it reads;
* new, empty, or a run directory of an earlier search (its ``run.json`` says ``"puzzle"``), unless
  ``force``: a folder holding other files is somebody else's.

Under torchrun, :func:`check_group` holds the plan to the process group it runs in. Once every check
passed, :func:`prepare` (rank 0) writes the run directory's first files: ``plan.json`` and ``run.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from puzzle.errors import ConfigError, EngineError, ModelFilesError, ResourceError
from puzzle.search.plan import Plan, check_feasible

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
PLAN_FILE = "plan.json"


def is_run_directory(path: Path) -> bool:
    """Whether ``path`` holds a run of this toolkit (a ``run.json`` written by :func:`puzzle.search.search`)."""
    try:
        data = json.loads((path / RUN_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("puzzle" in data or "config_sha256" in data)


def check_run_directory(run_dir: str | Path, *, protected: list[Path], force: bool = False) -> Path:
    """``run_dir`` as an absolute path, or a :class:`ConfigError` saying why it cannot hold a run."""
    if str(run_dir).strip() == "":
        raise ConfigError("--out is empty; name a run directory, e.g. --out runs/search")
    path = Path(run_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; name a directory for the run")
    for p in protected:
        p = p.resolve()
        if path == p or p in path.parents:
            raise ConfigError(f"--out {run_dir} is inside {p}; never write there: choose another run directory")
    for parent in (path, *path.parents):
        if (parent / "config.json").is_file() and not is_run_directory(parent):
            raise ConfigError(f"--out {run_dir} is inside the model directory {parent}; choose another run directory")
    if path.is_dir() and any(path.iterdir()) and not is_run_directory(path) and not force:
        raise ConfigError(f"--out {run_dir} holds files but no puzzle run ({RUN_FILE}); choose a new or empty "
                          f"directory, or pass --force to write into it")
    return path


def check_engine(plan: Plan) -> None:
    """The parent's own sub-blocks, which the MIP may keep anywhere, load in the plan's engine
    (:class:`EngineError` naming the layers and the rule, before any work)."""
    from puzzle.engines import engine_rules, violations

    rules, parent = engine_rules(plan.engine), plan.parent_config
    found = violations(rules, parent.blocks, parent)
    if found:
        raise EngineError(f"{rules.title} cannot load this parent's own blocks ({found[0]}), which any child may keep "
                          f"(rule read from {rules.source}); choose another --engine (transformers loads any)")


def check_plan(plan: Plan) -> None:
    """The budget is reachable, the engine loads the parent's blocks, and every stage fits the cluster
    (:class:`ResourceError` naming the smallest cluster that fits, before any work)."""
    check_engine(plan)
    check_feasible(plan)
    if plan.resources is not None and plan.resources.problem:
        raise ResourceError(plan.resources.problem)


def preflight(plan: Plan, run_dir: str | Path, *, force: bool = False) -> Path:
    """Check data, budget and run directory; return the run directory's absolute path. Writes nothing."""
    from puzzle.data.sources import check_sources
    from puzzle.io import safetensors_files
    from puzzle.parents.embedded import cache_root

    if plan.parent["directory"] is None:
        raise ModelFilesError(f"{plan.model} is a shape for planning (`puzzle plan --model {plan.model}`); a search "
                              "needs a model directory with its safetensors weights")
    safetensors_files(plan.parent["directory"])  # weights exist, and are safetensors (never a pickle)
    check_sources(plan.data)
    check_plan(plan)
    protected = [Path(plan.parent["directory"]), cache_root()]
    return check_run_directory(run_dir, protected=protected, force=force)


def check_group(plan: Plan, group: Any) -> None:
    """A search under ``torchrun`` runs on exactly the cluster the plan sized, on stages that shard."""
    if group.world == 1:
        return
    if plan.cluster.count != group.world:
        raise ConfigError(f"--cluster {plan.cluster.name} plans {plan.cluster.count} ranks but torchrun started "
                          f"{group.world}; pass --cluster {group.world}x{plan.cluster.device}")
    if plan.value("baselines"):
        raise ConfigError("--baselines runs in one process; drop it under torchrun (or run the baselines later "
                          "in one process on the same run directory, with --finalists 1 --child-bld-tokens 0 as this "
                          "cluster has them)")
    steps, batch = plan.value("gkd_steps"), plan.value("gkd_batch")
    if steps and batch % group.world:
        raise ConfigError(f"--gkd-batch {batch} does not split over {group.world} ranks; use a multiple "
                          f"of {group.world}")


def prepare(plan: Plan, run_dir: Path, shared: Path, *, shareable: Sequence[str]) -> None:
    """Rank 0, after every check: clean leftovers of interrupted writes, write the plan and the run record."""
    from puzzle import __version__
    from puzzle.io import atomic_write_json
    from puzzle.search.manifest import clean_temporaries

    for root in {run_dir, shared}:
        root.mkdir(parents=True, exist_ok=True)
        # a shared root may be in use by another search right now: only leftovers older than an hour go
        for path, size in clean_temporaries(root, min_age_s=0.0 if root == run_dir else 3600.0):
            log.warning("removed %s (%.1f MiB) left by an interrupted run", path, size / 2**20)
    if shared != run_dir and not (shared / RUN_FILE).is_file():  # marks it as a run directory for later preflights
        atomic_write_json(shared / RUN_FILE, {"puzzle": __version__, "shared": list(shareable)})
    atomic_write_json(run_dir / PLAN_FILE, plan.to_dict())
    atomic_write_json(run_dir / RUN_FILE, {"puzzle": __version__, "config": plan.config.to_dict(),
                                           "settings": plan.values()})
