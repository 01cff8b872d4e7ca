"""A replace-1-block scoring run's directory (:mod:`puzzle.scoring.artifact`): opened or resumed, then finished.

:func:`start_run` checks ``out_dir`` against the inputs (library, held-out ids, pairs) and returns the finished
result or a :class:`Run` that knows which layers are left; :func:`finish` writes the tables and the complete
manifest from every layer's record. The one-process run (:func:`puzzle.scoring.replace1.score_library`) and the
sharded one (:mod:`puzzle.scoring.sharded`) both open and finish a run this way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from block_library.artifact import Library
from puzzle import __version__
from puzzle.io import atomic_write_json, atomic_write_text
from puzzle.scoring import artifact
from puzzle.scoring.config import ScoreConfig
from puzzle.scoring.tables import block_table, cost_summary, subblock_table

log = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    directory: Path
    scores: pd.DataFrame
    """The solvers' table: one row per (layer, block label)."""
    subblocks: pd.DataFrame
    """One row per (layer, sub-block, variant)."""
    manifest: dict[str, Any]
    reused: bool = False
    """True when ``out_dir`` already held these scores and nothing ran."""


def load_ids(lib: Library, config: ScoreConfig) -> torch.Tensor:
    """The held-out token ids (N, T), tokenized with the library's tokenizer."""
    from puzzle.data import load_sequences
    from puzzle.loading import Source, load_tokenizer

    tok = load_tokenizer(Source(name=str(lib.directory), kind="library", directory=lib.directory))
    vf = lib.config.data.val_fraction if config.val_fraction is None else config.val_fraction
    return load_sequences(list(config.sources), tok, seq_len=config.seq_len, num_sequences=config.num_sequences,
                          split="validation", val_fraction=vf)


@dataclass
class Run:
    """A scoring run past its checks: what :func:`score_library` computes and where it writes."""

    lib: Library
    config: ScoreConfig
    """With ``val_fraction`` resolved (the library's when None)."""
    out: Path
    ids: torch.Tensor
    """(N, T) held-out token ids."""
    key: str
    """The inputs' key that every partial record carries."""
    records: dict[int, dict[str, Any]]
    """The layers finished by an earlier run (layer -> record)."""
    base: dict[str, Any]
    """The manifest, status running."""

    @property
    def todo(self) -> list[int]:
        return [l for l in range(self.lib.parent_config.num_hidden_layers) if l not in self.records]


def start_run(library: str | Path, out_dir: str | Path, config: ScoreConfig | None = None, *,
              force: bool = False) -> Run | ScoreResult:
    """Open the library, read the held-out ids and check ``out_dir``: the finished result when it holds
    these scores already, else a :class:`Run` (manifest written as running, earlier layers read)."""
    config = config or ScoreConfig()
    lib = Library(library)
    if config.val_fraction is None:
        config = replace(config, val_fraction=lib.config.data.val_fraction)
    out = Path(out_dir).expanduser().resolve()
    ids = load_ids(lib, config)
    inputs = {"library_sha256": artifact.library_hash(lib.directory), "data": config.data_spec(),
              "ids_sha256": artifact.ids_hash(ids), "pairs": config.pairs, "initial": config.initial}
    done_manifest = artifact.prepare(out, lib.directory, inputs, force=force)
    if done_manifest is not None:
        log.info("%s already holds these scores; nothing to do", out)
        return _read_result(out, done_manifest)
    key = artifact.inputs_key(inputs)
    records = artifact.read_partials(out, lib.parent_config.num_hidden_layers, key)
    base = _manifest(lib, config, inputs, ids, status="running")
    atomic_write_json(out / artifact.MANIFEST, base)
    if records:
        log.info("resuming: %d of %d layers already scored", len(records), lib.parent_config.num_hidden_layers)
    return Run(lib=lib, config=config, out=out, ids=ids, key=key, records=records, base=base)


def _manifest(lib: Library, config: ScoreConfig, inputs: dict[str, Any], ids: torch.Tensor, *,
              status: str) -> dict[str, Any]:
    N, T = ids.shape
    weights = "initial" if config.initial or lib.status != "trained" else "trained"
    return {"stage": artifact.STAGE, "status": status, "puzzle_version": __version__,
            "library": {"path": str(lib.directory), "sha256": inputs["library_sha256"], "status": lib.status,
                        "weights": weights},
            "inputs": inputs, "config": config.to_dict(),
            "tokens": {"sequences": N, "seq_len": T, "tokens": N * T, "scored_positions": N * (T - 1)}}


def finish(run: Run, *, wall: float, parent_seconds: float, computed: int, peak_mib: float | None = None,
           extra: dict[str, Any] | None = None) -> ScoreResult:
    """Write the tables and the complete manifest from every layer's record.

    ``peak_mib``: the peak RSS to record (default: this process's); ``extra``: more manifest keys."""
    lib, out, config, records = run.lib, run.out, run.config, run.records
    scores = block_table(lib, records)
    subs = subblock_table(lib, records, initial=config.initial)
    atomic_write_text(out / artifact.SCORES, scores.to_csv(index=False))
    atomic_write_text(out / artifact.SUBBLOCKS, subs.to_csv(index=False))
    L = lib.parent_config.num_hidden_layers
    if peak_mib is None:
        import resource

        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    manifest = dict(run.base, status="complete", cost=cost_summary(records, L), peak_rss_mib_this_run=round(peak_mib),
                    seconds={"wall_this_run": round(wall, 2), "parent_pass_this_run": round(parent_seconds, 2),
                             "layers_total": round(sum(r["seconds"] for r in records.values()), 2)},
                    layers_computed_this_run=computed, **(extra or {}))
    atomic_write_json(out / artifact.MANIFEST, manifest)
    log.info("scores of %d blocks over %d layers written to %s", len(scores), L, out)
    return ScoreResult(directory=out, scores=scores, subblocks=subs, manifest=manifest)


def _read_result(out: Path, manifest: dict[str, Any]) -> ScoreResult:
    scores = pd.read_csv(out / artifact.SCORES)
    subs = pd.read_csv(out / artifact.SUBBLOCKS)
    return ScoreResult(directory=out, scores=scores, subblocks=subs, manifest=manifest, reused=True)
