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

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from block_library.artifact import Library
from block_library.space import parse_variant
from block_library.variant import Variant, build_module
from puzzle import __version__
from puzzle.errors import NumericalError
from puzzle.io import atomic_write_json, atomic_write_text
from puzzle.scoring import artifact
from puzzle.scoring.activations import ParentCache, ParentRunner, run_parent
from puzzle.scoring.config import ScoreConfig
from puzzle.scoring.metrics import TokenSums
from puzzle.scoring.tables import block_table, cost_summary, parent_labels, subblock_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Replacement:
    """Layer ``layer`` with block ``attention|ffn`` (sub-block labels)."""

    layer: int
    attention: str
    ffn: str

    @property
    def label(self) -> str:
        return f"{self.attention}|{self.ffn}"


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


def replacements(lib: Library, layer: int, pairs: str) -> list[Replacement]:
    """The blocks measured at ``layer``: the parent's first, then attention variants, then FFN ones."""
    pa, pf = parent_labels(lib, layer)
    atts = [a for a in lib.labels(layer, "attention") if a != pa]
    ffns = [f for f in lib.labels(layer, "ffn") if f != pf]
    out = [Replacement(layer, pa, pf)] + [Replacement(layer, a, pf) for a in atts] + [Replacement(layer, pa, f) for f in ffns]
    if pairs == "exact":
        out += [Replacement(layer, a, f) for a in atts for f in ffns]
    return out


class LayerModules:
    """(sub-block, label) -> the variant's module of one layer (a DecoderBlock holding only that sub-block),
    float32 on ``device``, read from the library when first asked for. The parent's own halves stay; of
    the other variants only the last one asked for is kept, so a layer never holds all its variants
    (for a 405B parent they are 11 B parameters). ``keep``: more (sub-block, label) kept once loaded (a
    context child's own halves, :mod:`puzzle.scoring.context`)."""

    def __init__(self, lib: Library, layer: int, *, initial: bool, device: Any = "cpu",
                 keep: tuple[tuple[str, str], ...] = ()) -> None:
        self.lib, self.layer, self.initial, self.device = lib, layer, initial, device
        self.parent = set(zip(("attention", "ffn"), parent_labels(lib, layer))) | set(keep)
        self.loaded: dict[tuple[str, str], nn.Module] = {}

    def __getitem__(self, key: tuple[str, str]) -> nn.Module:
        if key not in self.loaded:
            for k in [k for k in self.loaded if k not in self.parent]:
                del self.loaded[k]
            sub, label = key
            with torch.device("meta"):  # no random init: every tensor comes from the library
                m = build_module(Variant(self.layer, sub, parse_variant(label, sub)), self.lib.parent_config)
            m.load_state_dict(self.lib.variant_state(self.layer, sub, label, initial=self.initial), assign=True)
            self.loaded[key] = m.float().eval().requires_grad_(False).to(self.device)
        return self.loaded[key]


def layer_modules(lib: Library, layer: int, *, initial: bool, device: Any = "cpu",
                  keep: tuple[tuple[str, str], ...] = ()) -> LayerModules:
    """The variants of ``layer``, loaded one at a time as they are used (see :class:`LayerModules`)."""
    return LayerModules(lib, layer, initial=initial, device=device, keep=keep)


def _block_output(rep: Replacement, cache: ParentCache, modules: LayerModules,
                  ctx: dict[str, Any], attn_out: dict[str, torch.Tensor], parent_attention: str) -> torch.Tensor:
    """The replaced block's output (N, T, H) on the cached input of its layer."""
    l = rep.layer
    if rep.attention == parent_attention:
        h = cache.mids[l]  # the parent's own attention half: already computed by the parent pass
    else:
        if rep.attention not in attn_out:  # exact mode reuses one attention output for every FFN
            attn_out[rep.attention] = modules[("attention", rep.attention)](cache.inputs[l], ctx)
        h = attn_out[rep.attention]
    return modules[("ffn", rep.ffn)](h, ctx)


def block_outputs(reps: list[Replacement], cache: ParentCache, modules: LayerModules,
                  ctx: dict[str, Any], attn_out: dict[str, torch.Tensor], parent_attention: str) -> torch.Tensor:
    """The replaced blocks of one layer on its cached input, stacked along the batch: (K * N, T, H)."""
    ys = [_block_output(r, cache, modules, ctx, attn_out, parent_attention) for r in reps]
    return ys[0] if len(ys) == 1 else torch.cat(ys)


def group_metrics(runner: ParentRunner, cache: ParentCache, reps: list[Replacement],
                  final: torch.Tensor) -> list[dict[str, Any]]:
    """The rows of a group from its last residual stream (K * N, T, H): head, log-probs, metrics."""
    N, l = cache.ids.shape[0], reps[0].layer
    rows = []
    for k, rep in enumerate(reps):
        sums = TokenSums()
        for sl, lp in runner.logprob_chunks(final[k * N:(k + 1) * N]):
            sums.add(cache.logprobs[sl], lp, cache.labels[sl])
        m = sums.means()
        bad = {name: v for name, v in m.items() if not math.isfinite(v)}
        if bad:
            raise NumericalError(f"layer {l}, block {rep.label}: {bad} is not finite; the variant's weights or "
                                 "activations overflow (is the library corrupt? rebuild or retrain it)")
        rows.append({"attention": rep.attention, "ffn": rep.ffn, **m, "tokens": sums.tokens})
    return rows


@torch.no_grad()
def score_group(runner: ParentRunner, cache: ParentCache, reps: list[Replacement],
                modules: LayerModules, ctx: dict[str, Any],
                attn_out: dict[str, torch.Tensor], parent_attention: str) -> list[dict[str, Any]]:
    """Measure replacements of one layer together, stacked along the batch: (K * N, T, H)."""
    ys = block_outputs(reps, cache, modules, ctx, attn_out, parent_attention)
    final = runner.suffix(ys, reps[0].layer + 1, ctx)  # (K * N, T, H)
    return group_metrics(runner, cache, reps, final)


def layer_groups(reps: list[Replacement], variant_batch: int) -> list[list[Replacement]]:
    """How a layer's replacements run: the parent's own block alone, in the reference pass's shapes (so
    its KL is exactly 0), then the others ``variant_batch`` at a time."""
    return [reps[:1]] + [reps[i:i + variant_batch] for i in range(1, len(reps), variant_batch)]


def layer_cost(num_replacements: int, layer: int, num_layers: int) -> dict[str, int]:
    """What a layer's replacements run: each its block and the L - 1 - l layers after it, and one head."""
    return {"replacements": num_replacements, "layer_forwards": num_replacements * (num_layers - layer),
            "head_evals": num_replacements}


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
