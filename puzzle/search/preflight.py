"""Preflight: everything a search can check before it does any work or writes any file.

The model's config and the target are read by :func:`puzzle.search.plan.resolve`; here the
model's weights (present, safetensors), the data sources, the budget's feasibility, the resource
plan (every stage fits the cluster's memory per rank) and the run directory are checked. Every refusal is a typed one-line
error (the CLI prints it and exits 2). A run directory must be

* named (not ``""``), and not an existing file;
* outside the parent's directory, the embedded-parent cache and any model directory (a folder
  holding ``config.json``): puzzle never writes next to weights it reads;
* new, empty, or a run directory of an earlier search (its ``run.json`` says ``"puzzle"``), unless
  ``force``: a folder holding other files is somebody else's.
"""

from __future__ import annotations

import json
from pathlib import Path

from puzzle.errors import ConfigError, EngineError, ModelFilesError, ResourceError
from puzzle.search.plan import Plan, check_feasible

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
