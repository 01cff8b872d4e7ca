"""Preflight: everything a search can check before it does any work or writes any file.

The model's config and the target are read by :func:`puzzle.search.resolver.resolve`; here the
model's weights (safetensors, every header read: :mod:`puzzle.search.parent_files`), the data sources
(each opened, its first document read), the budget's feasibility, the custom constraints (their layers
and names, and with the budget their feasibility on the analytic costs:
:mod:`puzzle.search.constraints_check`), the resource plan (every stage fits the cluster's memory per
rank), the cluster against this machine's devices and cores, the run directory and last the tokenizer
are checked. Every refusal is a typed one-line error (the CLI prints it and exits 2). A run directory must be

* named (not ``""``), not an existing file nor under one, and writable (or, not there yet, its nearest
  existing ancestor: ``os.access``, nothing written to find out);
* outside the parent's directory, the embedded-parent cache and any model directory (a folder
  holding ``config.json``): puzzle never writes next to weights it reads;
* new, empty, or a run directory of an earlier search (its ``run.json`` says ``"puzzle"``), unless
  ``force``: a folder holding other files is somebody else's.

Under torchrun, :func:`check_group` holds the plan to the process group it runs in. Once every check
passed, :func:`prepare` (rank 0) writes the run directory's first files: ``plan.json`` and ``run.json``;
with ``force``, into a directory that holds no run, it first names the entries it overwrites (a warning).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from puzzle.errors import ConfigError, EngineError, ModelFilesError, ResourceError
from puzzle.io import check_writable
from puzzle.search.constraints_check import check_constraints
from puzzle.search.lock import LOCK_FILE, check_free
from puzzle.search.plan import Plan, check_feasible

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
PLAN_FILE = "plan.json"
OVERWRITE_SHOWN = 5
"""``--force`` into a directory of other files names the first few that the search overwrites, and their count."""


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
    existing = next(p for p in (path, *path.parents) if p.exists())  # the run directory, or where it would be made
    if not existing.is_dir():
        raise ConfigError(f"--out {run_dir}: {existing} is a file, not a directory; name a run directory outside it")
    for p in protected:
        p = p.resolve()
        if path == p or p in path.parents:
            raise ConfigError(f"--out {run_dir} is inside {p}; never write there: choose another run directory")
    for parent in (path, *path.parents):
        if (parent / "config.json").is_file() and not is_run_directory(parent):
            raise ConfigError(f"--out {run_dir} is inside the model directory {parent}; choose another run directory")
    if path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()) and not is_run_directory(path) and not force:
        raise ConfigError(f"--out {run_dir} holds files but no puzzle run ({RUN_FILE}); choose a new or empty "
                          f"directory, or pass --force to write into it")
    check_writable("--out", run_dir, existing, what="a run directory")
    return path


def _overwritten(root: Path) -> list[str]:
    """The entries of ``root``, a directory that holds no puzzle run, that a search writes over: its
    run files, report and stage directories (``solve/``)."""
    from puzzle.search.stages import REGISTRY
    from puzzle.search.usage import USAGE_FILE

    if not root.is_dir() or is_run_directory(root):
        return []
    ours = {RUN_FILE, PLAN_FILE, USAGE_FILE, "report.csv", "report.png", *(s.name for s in REGISTRY.all())}
    return sorted(e.name + ("/" if e.is_dir() else "") for e in root.iterdir() if e.name in ours)


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
    """The budget is reachable, alone and with the custom constraints (which name only layers and variants
    that exist), the engine loads the parent's blocks, and every stage fits the cluster (:class:`ResourceError`
    naming the smallest cluster that fits, before any work)."""
    from block_library.space_values import check_space

    check_engine(plan)
    check_space(plan)  # a --space value that gives no variant
    check_feasible(plan)
    check_constraints(plan)  # the constraints' names and, with the budget, their feasibility on the analytic costs
    if plan.resources is not None and plan.resources.problem:
        raise ResourceError(plan.resources.problem)


def preflight(plan: Plan, run_dir: str | Path, *, force: bool = False, searching: bool = True) -> Path:
    """Check weights, data, plan, cluster and run directory; return the run directory's absolute path.

    Writes nothing. ``searching``: the search runs on this machine now, so the cluster's devices must be
    here (:func:`puzzle.search.cluster.check_here`) and the tokenizer must load; ``puzzle plan`` passes
    False (it sizes any cluster, and plans from a config with weights alone). The tokenizer is loaded last,
    the slowest check (about a second), after every refusal that needs no more than the paths."""
    from puzzle.data.sources import check_sources
    from puzzle.parents.embedded import cache_root
    from puzzle.search.cluster import check_here
    from puzzle.search.parent_files import check_tokenizer, check_weights

    if plan.parent["directory"] is None:
        raise ModelFilesError(f"{plan.model} is a shape for planning (`puzzle plan --model {plan.model}`); a search "
                              "needs a model directory with its safetensors weights")
    if searching and plan.parent.get("commit"):  # a hub id: the plan read its config.json alone; fetch the rest
        from puzzle.loading import resolve_source  # into huggingface_hub's cache (the same commit), not the run

        resolve_source(plan.model)
    check_weights(plan.parent["directory"])  # safetensors (never a pickle), each header parses, no file cut short
    check_sources(plan.data)  # every source opened, its first document read
    check_plan(plan)
    if searching:
        given = plan.settings["cluster"]  # derived: this process group on this machine's device, which is here
        check_here(plan.cluster, shown=None if given.source == "derived" else str(given.value))
    protected = [Path(plan.parent["directory"]), cache_root()]
    check_free(run_dir)  # first: another search writing there is what a half-written directory would mean
    path = check_run_directory(run_dir, protected=protected, force=force)
    if searching:
        check_tokenizer(plan.parent["directory"])
    return path


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
        if names := _overwritten(root):  # preflight let a directory of other files through: --force said so
            shown = ", ".join(names[:OVERWRITE_SHOWN]) + (", ..." if len(names) > OVERWRITE_SHOWN else "")
            log.warning("--force: %s holds no puzzle run, and this search overwrites %d of its entries: %s",
                        root, len(names), shown)
        root.mkdir(parents=True, exist_ok=True)
        # a shared root may be in use by another search right now: only leftovers older than an hour go
        for path, size in clean_temporaries(root, min_age_s=0.0 if root == run_dir else 3600.0):
            log.warning("removed %s (%.1f MiB) left by an interrupted run", path, size / 2**20)
    if shared != run_dir and not (shared / RUN_FILE).is_file():  # marks it as a run directory for later preflights
        atomic_write_json(shared / RUN_FILE, {"puzzle": __version__, "shared": list(shareable)})
    atomic_write_json(run_dir / PLAN_FILE, plan.to_dict())
    atomic_write_json(run_dir / RUN_FILE, {"puzzle": __version__, "config": plan.config.to_dict(),
                                           "settings": plan.values()})
