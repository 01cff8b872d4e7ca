"""The scores directory: resumable per-layer results, the final tables, and its manifest.

    scores/
      manifest.json          stage "score", status (running | complete), inputs (library hash, data
                             spec and token hash, pairs, initial), token counts, cost, wall time
      partial/L007.json      one layer's measured replacements, written atomically when it finishes
      scores.csv             the solvers' scores table (solvers/io.py): layer, variant, is_parent, kl,
                             loss_delta, top1_disagreement, scored (measured | additive)
      subblock_scores.csv    layer, subblock, variant, kl, loss_delta, top1_agreement, final_val_nmse

A rerun with the same inputs skips the finished layers (or does nothing when complete); with other
inputs it raises :class:`StaleArtifactError` naming what changed, unless forced.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from puzzle.errors import ConfigError, CorruptArtifactError, StaleArtifactError
from puzzle.io import atomic_write_json, read_json_file

STAGE = "score"
MANIFEST = "manifest.json"
PARTIAL = "partial"
SCORES = "scores.csv"
SUBBLOCKS = "subblock_scores.csv"
OUTPUTS = (MANIFEST, SCORES, SUBBLOCKS)


def library_hash(directory: Path) -> str:
    """sha256 of a library's manifest and index: they change whenever its variants or weights do."""
    h = hashlib.sha256()
    for name in ("manifest.json", "index.csv"):
        h.update((directory / name).read_bytes())
    return h.hexdigest()


def ids_hash(ids: torch.Tensor) -> str:
    """sha256 of the held-out token ids (N, T): catches a changed corpus or tokenizer."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    what = {"library_sha256": "the library (its manifest or index changed)",
            "data": "the data spec", "ids_sha256": "the held-out tokens (corpus or tokenizer changed)",
            "pairs": "the pairs mode", "initial": "initial vs trained weights"}
    out = []
    for key, text in what.items():
        if old.get(key) != new.get(key):
            if key in ("pairs", "initial", "data"):
                text += f" ({old.get(key)!r} -> {new.get(key)!r})"
            out.append(text)
    return out


def read_manifest(out: Path) -> dict[str, Any] | None:
    data = read_json_file(out / MANIFEST)
    if data is not None and data.get("stage") != STAGE:
        raise ConfigError(f"{out} holds a {data.get('stage')!r} artifact, not scores; choose another --out")
    return data


def prepare(out: Path, library: Path, inputs: dict[str, Any], *, force: bool) -> dict[str, Any] | None:
    """Check ``out`` against ``inputs``; return the manifest of a complete run with the same inputs
    (nothing to do), else None after clearing what ``force`` discards. Raises on stale results."""
    out, library = out.resolve(), library.resolve()
    if out == library or library in out.parents:
        raise ConfigError(f"{out} is inside the library {library}; write scores elsewhere (the library is never written)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    old = read_manifest(out) if out.is_dir() else None
    if old is None and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out} holds files but no scores manifest; choose another --out")
    if old is not None:
        changed = _changes(old["inputs"], inputs)
        if changed and not force:
            raise StaleArtifactError(f"{out} holds scores of other inputs: {'; '.join(changed)} differ. "
                                     "Pass --force to recompute, or choose another --out")
        if force:
            shutil.rmtree(out / PARTIAL, ignore_errors=True)
            for name in OUTPUTS:
                (out / name).unlink(missing_ok=True)
        elif old.get("status") == "complete":
            return old
    (out / PARTIAL).mkdir(parents=True, exist_ok=True)
    return None


def partial_path(out: Path, layer: int) -> Path:
    return out / PARTIAL / f"L{layer:03d}.json"


def read_partials(out: Path, num_layers: int, inputs_key: str) -> dict[int, dict[str, Any]]:
    """The finished layers' results (layer -> record); a record of other inputs is an error."""
    done = {}
    for layer in range(num_layers):
        path = partial_path(out, layer)
        if not path.is_file():
            continue
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CorruptArtifactError(f"{path} is not valid JSON ({e}); delete it to recompute layer {layer}") from None
        if rec.get("inputs_key") != inputs_key:
            raise StaleArtifactError(f"{path} was computed from other inputs; pass --force to recompute")
        done[layer] = rec
    return done


def write_partial(out: Path, layer: int, record: dict[str, Any]) -> None:
    atomic_write_json(partial_path(out, layer), record)


def inputs_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
