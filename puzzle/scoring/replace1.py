"""Replace-1-block scoring: the parent with one layer's block swapped for a library variant.

For every layer l and every block ``ATTENTION|FFN`` of the library, the child is the parent with
only block l replaced; its quality on held-out tokens is the mean per-token KL(parent || child),
the LM-loss delta (child CE - parent CE) and the top-1 agreement with the parent
(:mod:`puzzle.scoring.metrics`). The parent runs once (:mod:`puzzle.scoring.activations`); a
replacement at layer l runs its block on the cached input, the parent's layers l+1..L-1 and the
head, so it costs L - l layer forwards instead of L.

Pairs. ``additive`` (default) measures each sub-block variant with the other half kept as the
parent's (blocks ``a|F_parent`` and ``A_parent|f``, and ``A_parent|F_parent`` once per layer) and
scores a block whose halves both differ as the *sum* of its halves' scores (kl, loss_delta and
top-1 disagreement alike; the parent block scores exactly 0, so this is the first-order,
no-interaction estimate). ``exact`` measures every A x F combination. ``scores.csv`` marks each
row ``measured`` or ``additive``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from block_library.artifact import Library
from puzzle.scoring import artifact
from puzzle.scoring.activations import ParentCache, ParentRunner, run_parent
from puzzle.scoring.config import ScoreConfig
from puzzle.scoring.replacements import Replacement, layer_cost, layer_groups, layer_modules, replacements, score_group
from puzzle.scoring.run import ScoreResult, finish, load_ids, start_run
from puzzle.scoring.tables import parent_labels

__all__ = ["Replacement", "ScoreResult", "layer_groups", "layer_modules", "load_ids", "replacements", "score_group",
           "score_layer", "score_library"]


def score_layer(runner: ParentRunner, cache: ParentCache, lib: Library, layer: int, config: ScoreConfig,
                *, bar: Any = None) -> dict[str, Any]:
    """Every replacement of one layer: its measured rows and what it cost."""
    t0 = time.perf_counter()
    reps = replacements(lib, layer, config.pairs)
    modules = layer_modules(lib, layer, initial=config.initial)
    ctx, attn_out, pa = runner.context(cache.ids.shape[1]), {}, parent_labels(lib, layer)[0]
    rows = []
    for g in layer_groups(reps, config.variant_batch):
        rows += score_group(runner, cache, g, modules, ctx, attn_out, pa)
        if bar is not None:
            bar.update(len(g))
    return {"layer": layer, "rows": rows, "seconds": round(time.perf_counter() - t0, 3),
            "cost": layer_cost(len(reps), layer, runner.num_layers)}


def score_library(library: str | Path, out_dir: str | Path, config: ScoreConfig | None = None, *,
                  force: bool = False, progress: bool = True,
                  on_layer: Callable[[int], None] | None = None) -> ScoreResult:
    """Score every (layer, block) of a library by replace-1-block; write ``out_dir`` (resumable).

    ``on_layer(layer)`` is called after each layer's results are saved. A finished ``out_dir`` with
    the same inputs is returned as is; other inputs raise :class:`StaleArtifactError` unless ``force``.
    Under ``torchrun`` (WORLD_SIZE > 1) the layers are sharded over the ranks
    (:mod:`puzzle.scoring.sharded`); every rank returns the same result.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from puzzle.scoring.sharded import score_library_sharded

        return score_library_sharded(library, out_dir, config, force=force, progress=progress, on_layer=on_layer)
    t_start = time.perf_counter()
    run = start_run(library, out_dir, config, force=force)
    if isinstance(run, ScoreResult):
        return run
    todo = run.todo
    parent_seconds = 0.0
    if todo:
        parent_seconds, fresh = _score_layers(run.lib, run.ids, run.config, todo, run.out, run.key,
                                              progress=progress, on_layer=on_layer)
        run.records.update(fresh)
    return finish(run, wall=time.perf_counter() - t_start, parent_seconds=parent_seconds, computed=len(todo))


def _score_layers(lib: Library, ids: torch.Tensor, config: ScoreConfig, todo: list[int], out: Path, key: str, *,
                  progress: bool, on_layer: Callable[[int], None] | None) -> tuple[float, dict[int, dict[str, Any]]]:
    t0 = time.perf_counter()
    model = lib.assemble(lib.parent_config.blocks, initial=config.initial)  # the parent, from the library
    runner = ParentRunner(model, head_chunk=config.head_chunk)
    cache = run_parent(runner, ids)
    parent_seconds = time.perf_counter() - t0
    total = sum(len(replacements(lib, l, config.pairs)) for l in todo)
    bar = tqdm(total=total, desc="score", unit="block", disable=not progress)
    records = {}
    for l in todo:
        rec = score_layer(runner, cache, lib, l, config, bar=bar)
        rec["inputs_key"] = key
        artifact.write_partial(out, l, rec)
        records[l] = rec
        if on_layer is not None:
            on_layer(l)
    bar.close()
    return parent_seconds, records
