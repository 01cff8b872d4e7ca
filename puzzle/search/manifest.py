"""Stages of a run directory: each writes its files and a manifest; a rerun skips what is still valid.

    ROOT/
      run.json                 the run's config (what the user asked for)
      <stage>/stage.json       the manifest, written last and atomically (format below)

    {"stage": "score", "format": 2, "status": "complete", "seconds": 41.2,
     "key": {..., "puzzle": "0.1.0"}, "key_sha256": "...",
     "outputs": {"scores": "score/scores/scores.csv", "rows": 12}, "paths": ["scores"],
     "record": ["score/**"],
     "files": {"score/scores/scores.csv": {"size": 5120, "sha256": "..."}, ...},
     "run_id": "...", "outputs_sha256": "..."}

**Keys.** A stage's *key* is everything its result depends on: its own settings, the package version
(added here) and the ``outputs_sha256`` of the stages it reads. ``outputs_sha256`` hashes what a stage
*produced* (its recorded files and its outputs) and the ``run_id`` of that completion, so redoing a
stage invalidates exactly the stages after it, even when it happens to write the same bytes again
(a rebuilt library must not be trusted to match the trained one it replaced); a copied or moved run
directory keeps its manifests, hence its hashes, and stays valid.

**Paths.** ``fn`` returns outputs whose paths (``Path`` values, or ``str`` values that are absolute
paths) lie under ``root``; the manifest stores them relative to ``root`` and lists their keys under
``"paths"``, and :class:`StageResult` gives them back absolute under the root it was given. A copied
or moved run directory therefore reads its own files only. A path output outside ``root`` is a
``ValueError``: a run directory is self-contained.

**Recorded files.** ``record`` is a list of glob patterns relative to ``root`` naming the files a
stage owns (``*`` and ``?`` within a name, ``**`` for any number of directories, a pattern naming a
directory means everything under it, a leading ``!`` excludes); by default ``<stage>/**``. Names
starting with ``.`` (temporaries of interrupted writes) and the ``<stage>/stage.json`` manifests are
never recorded. When a later stage rewrites files inside an earlier stage's directory (BLD trains
``library/lib`` in place), each stage must record only the files it wrote last, or the earlier stage
is invalidated by the later one.

**Skipping.** A stage is skipped when its manifest is complete, has the same key hash, and every
recorded file exists with its recorded size (and, with ``verify=True``, its recorded sha256).

**Redoing.** Stage code resumes partial work (BLD checkpoints, per-layer scores), so a rerun must not
resume onto damaged files. When a recorded file is missing or changed, the stage's own directory
``root/<stage>`` is deleted whole, and of its recorded files elsewhere (BLD's files in
``library/lib``) only the bad ones are deleted: the files there belong to an upstream stage too.
Since the key is unchanged, the rerun must write every bad file again; a rerun that does not (stage
code that trusts its other files and returns early) is a :class:`CorruptArtifactError` naming what
to delete, rather than a manifest that silently records fewer files. When only the key changed, the
old manifest is removed and the directory kept for resuming, or, with ``fresh=True``, deleted first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import puzzle
from puzzle.errors import CorruptArtifactError
from puzzle.io import atomic_write_json, read_json_file
from puzzle.search.files import MANIFEST, absolute, clean_temporaries, file_sha256, matching_files, record_files

__all__ = ["MANIFEST", "StageCheck", "StageResult", "clean_temporaries", "inspect_stage", "key_sha256",
           "matching_files", "read_stage", "record_files", "run_stage"]

log = logging.getLogger(__name__)

FORMAT = 2


def key_sha256(key: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-able key (sorted keys, no whitespace)."""
    return hashlib.sha256(_canonical(key).encode()).hexdigest()


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class StageResult:
    name: str
    directory: Path
    key_sha256: str
    """Hash of the stage's key (its settings, the package version, its inputs' ``outputs_sha256``)."""
    outputs_sha256: str
    """Hash of what the stage produced: its recorded files (path, size, sha256) and its outputs.
    Put this, not ``key_sha256``, into the keys of the stages that read this one."""
    outputs: dict[str, Any]
    """What the stage reported (figures, and paths as absolute strings under the current root)."""
    skipped: bool
    seconds: float
    reason: str
    """Why it ran or was skipped, e.g. ``"score: score/scores/scores.csv is missing; redoing score"``."""


@dataclass(frozen=True)
class StageCheck:
    """What :func:`run_stage` would do now (from :func:`inspect_stage`, which changes nothing)."""

    action: str
    """``"skip"`` or ``"run"``."""
    reason: str
    outputs_sha256: str | None
    """The recorded outputs hash when the stage would be skipped, else None."""
    outputs: dict[str, Any] | None
    """The recorded outputs (paths absolute under the current root) when skipped, else None."""


def stage_key(key: Mapping[str, Any]) -> dict[str, Any]:
    """The key as recorded: the caller's entries and the package version."""
    if "puzzle" in key:
        raise ValueError("stage keys may not use the entry 'puzzle': run_stage adds the package version there")
    return {**key, "puzzle": puzzle.__version__}


def read_stage(directory: Path) -> dict[str, Any] | None:
    """The stage manifest in ``directory``, or None if there is none; a garbled one is an error."""
    path = directory / MANIFEST
    try:
        data = read_json_file(path)
    except CorruptArtifactError as e:
        raise CorruptArtifactError(f"{e}; delete {directory} to redo that stage") from None
    if data is None:
        return None
    if not isinstance(data, dict) or "key_sha256" not in data:
        raise CorruptArtifactError(f"{path} is not a stage manifest; delete {directory} to redo that stage")
    return data


# ------------------------------------------------------------------------------------- checking


def inspect_stage(root: Path, name: str, key: Mapping[str, Any], *, record: Sequence[str] | None = None,
                  verify: bool = False) -> StageCheck:
    """Would :func:`run_stage` skip stage ``name`` now? Reads manifests and file sizes (and, with
    ``verify``, file contents); writes, creates and deletes nothing. A garbled manifest raises
    :class:`CorruptArtifactError` as :func:`run_stage` would."""
    _patterns(record, name)  # refuse bad patterns here too, before a real run would
    key = stage_key(key)
    check, _, _ = _check(absolute(root), name, key_sha256(key), key, verify=verify)
    return check


def _check(root: Path, name: str, sha: str, key: Mapping[str, Any], *,
           verify: bool) -> tuple[StageCheck, dict[str, Any] | None, list[str]]:
    """The verdict, the manifest found (if any) and the recorded files that are missing or changed."""
    directory = root / name
    done = read_stage(directory)
    if done is None:
        return StageCheck("run", f"{name}: never completed", None, None), None, []
    if done.get("status") != "complete" or done["key_sha256"] != sha:
        return StageCheck("run", f"{name}: {_key_change(done.get('key'), key)}", None, None), done, []
    files = _manifest_files(done, root, directory)
    bad = [(rel, problem) for rel, rec in files.items() if (problem := _file_problem(root, rel, rec, verify=verify))]
    if bad:
        rel, problem = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        reason = f"{name}: {rel} {problem}{more}; redoing {name}"
        return StageCheck("run", reason, None, None), done, [r for r, _ in bad]
    outputs = _absolute_outputs(root, done.get("outputs", {}), done.get("paths", []), directory)
    return StageCheck("skip", f"{name}: up to date", done.get("outputs_sha256"), outputs), done, []


def _key_change(old: Any, new: Mapping[str, Any]) -> str:
    if not isinstance(old, dict):
        return "its key changed"
    new = json.loads(_canonical(new))  # as it would be stored: tuples as lists, other objects as str
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return f"its key changed ({', '.join(changed)})" if changed else "its key changed"


def _manifest_files(done: dict[str, Any], root: Path, directory: Path) -> dict[str, dict[str, Any]]:
    files = done.get("files")
    ok = isinstance(files, dict) and isinstance(done.get("outputs_sha256"), str) and all(
        isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
        and _inside(root, rel) for rel, r in files.items())
    if not ok:
        raise CorruptArtifactError(f"{directory / MANIFEST} lacks a valid file listing; delete {directory} "
                                   "to redo that stage")
    return files


def _inside(root: Path, rel: Any) -> bool:
    """``rel`` is a plain relative path that stays under ``root`` (a tampered manifest never reaches out)."""
    return isinstance(rel, str) and not os.path.isabs(rel) and ".." not in Path(rel).parts and bool(rel)


def _file_problem(root: Path, rel: str, rec: Mapping[str, Any], *, verify: bool) -> str | None:
    path = root / rel
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != rec["size"]:
        return f"changed (size {size} != {rec['size']})"
    if verify and (sha := file_sha256(path)) != rec["sha256"]:
        return f"changed (sha256 {sha[:12]} != {rec['sha256'][:12]})"
    return None


# ------------------------------------------------------------------------------------- running


def run_stage(root: Path, name: str, key: Mapping[str, Any], fn: Callable[[Path], dict[str, Any]], *,
              record: Sequence[str] | None = None, verify: bool = False, fresh: bool = False) -> StageResult:
    """Run stage ``name`` in ``root/name`` unless it is up to date (see the module docstring).

    ``fn(directory)`` does the work and returns the outputs to record (JSON-able; paths under
    ``root``). ``record``: glob patterns, relative to ``root``, of the files the stage owns (default
    ``name/**``). ``verify``: compare the recorded files' sha256 too before skipping, not only their
    sizes. ``fresh``: delete the stage directory before running when its key changed (for stages that
    cannot resume over another key's partial files); resumable stages keep it.
    """
    root = absolute(root)
    directory = root / name
    patterns = _patterns(record, name)
    key = stage_key(key)
    sha = key_sha256(key)
    check, done, bad = _check(root, name, sha, key, verify=verify)
    if check.action == "skip":
        log.info("stage %s: up to date, skipped", name)
        assert check.outputs_sha256 is not None and check.outputs is not None
        return StageResult(name, directory, sha, check.outputs_sha256, check.outputs, skipped=True, seconds=0.0,
                           reason=check.reason)
    if bad:
        log.warning("%s", check.reason)
        _remove_bad(root, name, bad)
    elif done is not None and fresh:
        shutil.rmtree(directory)
    elif done is not None:
        (directory / MANIFEST).unlink()  # no longer complete for this key: never skip on a stale manifest
    directory.mkdir(parents=True, exist_ok=True)
    log.info("stage %s: running (%s)", name, check.reason)
    t0 = time.perf_counter()
    outputs, paths = _relative_outputs(root, fn(directory))
    files = record_files(root, patterns)
    lost = [rel for rel in bad if rel not in files]
    if lost:
        raise CorruptArtifactError(
            f"{name}: {lost[0]} was missing or changed, and redoing {name} did not write it again (its code "
            f"trusted its other files); delete {root / Path(lost[0]).parts[0]} to redo it from the start")
    run_id = uuid.uuid4().hex  # this completion: a redone stage never passes for the one it replaced
    outputs_sha = outputs_sha256(files, {**outputs, "run_id": run_id})
    seconds = time.perf_counter() - t0
    atomic_write_json(directory / MANIFEST, {
        "stage": name, "format": FORMAT, "status": "complete", "seconds": seconds, "key": key, "key_sha256": sha,
        "outputs": outputs, "paths": paths, "record": patterns, "files": files, "run_id": run_id,
        "outputs_sha256": outputs_sha})
    return StageResult(name, directory, sha, outputs_sha, _absolute_outputs(root, outputs, paths, directory),
                       skipped=False, seconds=seconds, reason=check.reason)


def _remove_bad(root: Path, name: str, bad: Sequence[str]) -> None:
    """Delete the stage's own directory whole, and its bad recorded files elsewhere under ``root``."""
    shutil.rmtree(root / name, ignore_errors=True)
    for rel in bad:
        if Path(rel).parts[0] != name:
            (root / rel).unlink(missing_ok=True)


def outputs_sha256(files: Mapping[str, Mapping[str, Any]], outputs: Mapping[str, Any]) -> str:
    """The hash of a stage's product: its sorted file listing (path, size, sha256) and its outputs
    (paths relative to the root), so it is the same in a copied or moved run directory."""
    listing = [[rel, files[rel]["size"], files[rel]["sha256"]] for rel in sorted(files)]
    return key_sha256({"files": listing, "outputs": dict(outputs)})


def _relative_outputs(root: Path, outputs: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Outputs with path values made relative to ``root``, and the keys that are paths."""
    if not isinstance(outputs, Mapping):
        raise TypeError(f"a stage function must return a dict of outputs, not {type(outputs).__name__}")
    relative: dict[str, Any] = {}
    paths: list[str] = []
    for k, v in outputs.items():
        if isinstance(v, Path) or (isinstance(v, str) and os.path.isabs(v)):
            relative[k] = _relative_to_root(root, Path(v), k)
            paths.append(k)
        else:
            relative[k] = v
    return relative, paths


def _relative_to_root(root: Path, path: Path, key: str) -> str:
    path = absolute(path)
    for base, p in ((root, path), (root.resolve(), path.resolve())):  # the second: root reached via a symlink
        try:
            return p.relative_to(base).as_posix() or "."
        except ValueError:
            pass
    raise ValueError(f"stage output {key!r} = {path} is outside the run directory {root}; a run directory must "
                     "be self-contained (write it under the stage's directory)")


def _absolute_outputs(root: Path, outputs: Mapping[str, Any], paths: Sequence[str], directory: Path) -> dict[str, Any]:
    result = dict(outputs)
    for k in paths:
        if k not in result or not _inside(root, result[k]):
            raise CorruptArtifactError(f"{directory / MANIFEST}: output {k!r} is not a path under the run "
                                       f"directory; delete {directory} to redo that stage")
        result[k] = str(root / result[k]) if result[k] != "." else str(root)
    return result


# ------------------------------------------------------------------------------------- recording


def _patterns(record: Sequence[str] | None, name: str) -> list[str]:
    patterns = [f"{name}/**"] if record is None else list(record)
    if isinstance(record, str):
        raise TypeError(f"record must be a list of patterns, not the string {record!r}")
    for p in patterns:
        bare = p.removeprefix("!")
        if not bare or os.path.isabs(bare) or ".." in Path(bare).parts:
            raise ValueError(f"record pattern {p!r} of stage {name!r} must be a path relative to the run directory")
    return patterns
