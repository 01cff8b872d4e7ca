"""Stages of a run directory: each writes its artifact and a manifest; a rerun skips what is valid.

    run/
      run.json                 the run's config (what the user asked for)
      <stage>/stage.json       {"stage", "key", "key_sha256", "status": "complete", "seconds", "outputs"}

A stage's *key* is everything its result depends on: its own config section and the key hashes
of the stages it reads. A stage whose ``stage.json`` is complete with the same key hash is
skipped; otherwise it runs (its own code resumes partial work: BLD from its checkpoint, scoring
from its finished layers) and its manifest is written last, atomically. A changed budget thus
changes only the MIP's key and the stages after it: the library and scores are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.errors import CorruptArtifactError
from puzzle.io import atomic_write_json, read_json_file

log = logging.getLogger(__name__)

MANIFEST = "stage.json"


def key_sha256(key: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-able key (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


@dataclass(frozen=True)
class StageResult:
    name: str
    directory: Path
    key_sha256: str
    outputs: dict[str, Any]
    """What the stage reported (paths, figures); read back from the manifest when skipped."""
    skipped: bool
    seconds: float


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


def run_stage(run_dir: Path, name: str, key: Mapping[str, Any], fn: Callable[[Path], dict[str, Any]], *,
              fresh: bool = False) -> StageResult:
    """Run stage ``name`` in ``run_dir/name`` unless a complete manifest with the same key exists.

    ``fn(directory)`` does the work and returns the outputs to record (JSON-able). ``fresh``: clear
    the stage directory before running when its key changed (for stages that cannot resume over
    another key's partial files); resumable stages keep it.
    """
    directory = run_dir / name
    sha = key_sha256(key)
    done = read_stage(directory)
    if done is not None and done.get("status") == "complete" and done["key_sha256"] == sha:
        log.info("stage %s: up to date, skipped", name)
        return StageResult(name, directory, sha, done.get("outputs", {}), skipped=True, seconds=0.0)
    if done is not None and fresh:
        shutil.rmtree(directory)
    elif done is not None:
        (directory / MANIFEST).unlink()  # no longer complete for this key: never skip on a stale manifest
    directory.mkdir(parents=True, exist_ok=True)
    log.info("stage %s: running", name)
    t0 = time.perf_counter()
    outputs = fn(directory)
    seconds = time.perf_counter() - t0
    atomic_write_json(directory / MANIFEST, {"stage": name, "key": dict(key), "key_sha256": sha,
                                             "status": "complete", "seconds": seconds, "outputs": outputs})
    return StageResult(name, directory, sha, outputs, skipped=False, seconds=seconds)
