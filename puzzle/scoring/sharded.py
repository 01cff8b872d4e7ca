"""Replace-1-block scoring with the parent's layers sharded over ``torchrun`` ranks.

    torchrun --nproc-per-node 8 -m puzzle.cli.main score runs/lib --out runs/scores

For a parent too large for one device (a 70B parent is 140 GB in bf16). Every rank holds a
contiguous run of the parent's layers (:func:`block_library.distributed.split_layers` on the
layers' parameter counts), read from the library's per-layer files; rank 0 also the embedding,
the last rank the final norm, the LM head and the parent's log-probs. No other part of the parent
is ever read (the model is built on the meta device and only the rank's tensors are assigned).

Parent pass (as :func:`block_library.teacher.run_pass`): rank 0 embeds the held-out ids (N, T),
every rank runs its layers on the stream it receives, caches each layer's input and mid stream
(N, T, H) and sends the stream on; the last rank keeps the log-probs (N, T-1, V).

Replacements: one fixed global list of jobs, in layer order, a job being one group of a layer's
replacements exactly as the one-process path groups them (:func:`~puzzle.scoring.replacements.layer_groups`).
Every rank walks the list and takes part in the jobs of layers owned by itself or an earlier rank:

    owner of layer l:  block(s) on the cached input of l -> its layers l+1.. -> send to rank + 1
    a later rank:      recv from rank - 1 -> all its layers -> send      (the last: head and metrics)

A rank sends in list order and its successor receives in the same order, so the matching needs no
negotiation, and as messages only flow to rank + 1 it cannot deadlock.

Pipeline efficiency: a send waits for the successor's matching recv (gloo and NCCL alike), so a
rank runs at most about one job ahead of its successor, no stream piles up, and the ranks work
concurrently (rank r starts its next replacement while rank r+1 runs the previous one). Every job
ends on the last rank, which runs its layers and the head for each, so that rank bounds the run:
about jobs x (L/W layers + head), against one process's sum over jobs of (L - l layers + head),
roughly W/2 times faster for many layers; the early ranks idle once their own jobs are sent. The
split balances memory (parameters), not this work.

Results: the last rank writes each layer's record (``partial/L007.json``) when the layer's last job
is scored, so a killed run resumes per layer as before (the ranks share the output directory, as
BLD's ranks share the library); rank 0 checks the directory, reads the ids, gathers the records
(``gather_object``) and writes ``scores.csv`` and the manifest as one process does. The same
functions run in the same shapes as one process: the same scores, the parent's own block exactly 0.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from block_library.artifact import Library
from block_library.distributed import Shard, init_shard, split_layers
from puzzle.errors import ConfigError, CorruptArtifactError
from puzzle.model import PuzzleForCausalLM
from puzzle.model.modeling import RotaryEmbedding
from puzzle.peak import peak_rss_bytes
from puzzle.scoring import artifact
from puzzle.scoring.activations import ParentCache, ParentRunner, attention_half
from puzzle.scoring.config import ScoreConfig
from puzzle.scoring.memory import score_layer_costs
from puzzle.scoring.replacements import (Replacement, block_outputs, group_metrics, layer_cost, layer_groups,
                                         layer_modules, replacements)
from puzzle.scoring.run import Run, ScoreResult, finish, start_run
from puzzle.scoring.tables import parent_labels

log = logging.getLogger(__name__)

SHARED = "shared.safetensors"


@dataclass(frozen=True)
class Job:
    """One group of replacements of one layer: what travels from its owner to the last rank."""

    layer: int
    reps: tuple[Replacement, ...]
    closes_layer: bool
    """The layer's last group: its record is complete once this one is scored."""


def schedule(lib: Library, todo: list[int], config: ScoreConfig) -> list[Job]:
    """The global job list every rank computes alike: the layers in order, each one's groups in order."""
    jobs = []
    for l in todo:
        groups = layer_groups(replacements(lib, l, config.pairs), config.variant_batch)
        jobs += [Job(l, tuple(g), i == len(groups) - 1) for i, g in enumerate(groups)]
    return jobs


def _shared_tensors(lib: Library, names: list[str]) -> dict[str, torch.Tensor]:
    """Only ``names`` of the library's shared tensors (embedding, final norm, untied head)."""
    from safetensors import SafetensorError, safe_open

    path = lib.directory / SHARED
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            missing = [n for n in names if n not in f.keys()]
            if missing:
                raise CorruptArtifactError(f"{path} lacks {missing}; rebuild the library")
            return {n: f.get_tensor(n) for n in names}
    except (SafetensorError, OSError) as e:
        raise CorruptArtifactError(f"cannot read {path}: {e}") from None


def load_rank_parent(lib: Library, shard: Shard, *, initial: bool = False) -> PuzzleForCausalLM:
    """The parent with only this rank's parts in memory (float32, on its device), the rest on meta."""
    pc = lib.parent_config
    with torch.device("meta"):
        model = PuzzleForCausalLM(pc)
    state = {}
    for l in shard.layers:
        for sub, label in zip(("attention", "ffn"), parent_labels(lib, l)):
            for name, t in lib.variant_state(l, sub, label, initial=initial).items():
                state[f"model.layers.{l}.{name}"] = t
    tied = pc.tie_word_embeddings
    names = ["model.embed_tokens.weight"] if shard.first or (shard.last and tied) else []
    if shard.last:
        names += ["model.norm.weight"] + ([] if tied else ["lm_head.weight"])
    state.update(_shared_tensors(lib, names))
    state = {k: v.to(shard.device, torch.float32) for k, v in state.items()}
    loaded = model.load_state_dict(state, strict=False, assign=True)
    if loaded.unexpected_keys:
        raise CorruptArtifactError(f"{lib.directory}: unexpected parent tensors {loaded.unexpected_keys[:6]}")
    if tied and shard.last:
        model.lm_head.weight = model.model.embed_tokens.weight
    for l in shard.layers:
        if any(p.is_meta for p in model.model.layers[l].parameters()):
            raise CorruptArtifactError(f"{lib.directory}: the parent's layer {l} lacks tensors; rebuild the library")
    model.model.rotary_emb = RotaryEmbedding(pc.rope_parameters, pc.head_dim)  # one built on meta cannot compute
    return model.eval()


@torch.no_grad()
def parent_pass(runner: ParentRunner, shard: Shard, ids: torch.Tensor, keep: set[int]) -> ParentCache:
    """The parent over ids (N, T) through this rank's layers, caching the input and mid streams of the
    layers in ``keep``; the last rank also computes the log-probs."""
    N, T = ids.shape
    ctx = runner.context(T, device=shard.device)
    ids = ids.to(shard.device)
    x = runner.embed(ids) if shard.first else shard.recv((N, T, runner.config.hidden_size), torch.float32)
    inputs, mids = {}, {}
    for l in shard.layers:
        block = runner.layers[l]
        if l in keep:
            inputs[l], mids[l] = x, attention_half(block, x, ctx)  # (N, T, H) each
        x = block(x, ctx)  # as the runtime applies it, so the parent's own row reproduces it bit for bit
    logprobs = None
    if shard.last:
        logprobs = torch.empty(N, T - 1, runner.config.vocab_size, device=shard.device)
        for rows, lp in runner.logprob_chunks(x):
            logprobs[rows] = lp
    else:
        shard.send(x)
    return ParentCache(ids=ids, inputs=inputs, mids=mids, logprobs=logprobs)


@torch.no_grad()
def run_jobs(lib: Library, runner: ParentRunner, shard: Shard, cache: ParentCache, jobs: list[Job],
             owners: dict[int, int], config: ScoreConfig, scored: Callable[[Job, list[dict[str, Any]]], None]) -> None:
    """This rank's part of every job (see the module docstring); ``scored(job, rows)`` on the last rank."""
    N, T = cache.ids.shape
    ctx = runner.context(T, device=shard.device)
    modules: Any = {}
    attn_out: dict[str, torch.Tensor] = {}
    current, stop = None, shard.layers.stop
    for job in jobs:
        owner = owners[job.layer]
        if owner > shard.rank:
            continue
        if owner == shard.rank:
            if job.layer != current:  # the layer's variants, one layer at a time (only this rank's files are read)
                modules = layer_modules(lib, job.layer, initial=config.initial, device=shard.device)
                current = job.layer
            pa = parent_labels(lib, job.layer)[0]
            x = block_outputs(list(job.reps), cache, modules, ctx, attn_out, pa)  # (K * N, T, H)
            x = runner.suffix(x, job.layer + 1, ctx, stop=stop)
            if job.closes_layer:
                modules, attn_out, current = {}, {}, None  # type: ignore[assignment]
        else:
            x = shard.recv((len(job.reps) * N, T, runner.config.hidden_size), torch.float32)
            x = runner.suffix(x, shard.layers.start, ctx, stop=stop)
        if shard.last:
            scored(job, group_metrics(runner, cache, list(job.reps), x))
        else:
            shard.send(x)


def _open(library: str | Path, out_dir: str | Path, config: ScoreConfig | None, shard: Shard,
          force: bool) -> tuple[Run | None, dict[str, Any] | ScoreResult]:
    """Rank 0 checks the directory and reads the ids; every rank learns the outcome (or its error)."""
    run, shared = None, None
    if shard.first:
        try:
            opened = start_run(library, out_dir, config, force=force)
        except Exception as e:  # every rank raises it, not only rank 0
            shared = e
        else:
            if isinstance(opened, ScoreResult):
                shared = opened
            else:
                run = opened
                shared = {"config": run.config, "out": run.out, "ids": run.ids, "key": run.key, "todo": run.todo}
    shared = shard.broadcast(shared)
    if isinstance(shared, Exception):
        raise shared
    return run, shared


class LayerRecords:
    """The last rank's collector: a layer's rows until its last job, then its record saved (resumable)."""

    def __init__(self, out: Path, key: str, num_layers: int, *, bar: Any = None,
                 on_layer: Callable[[int], None] | None = None) -> None:
        self.out, self.key, self.num_layers, self.bar, self.on_layer = out, key, num_layers, bar, on_layer
        self.records: dict[int, dict[str, Any]] = {}
        self.rows: dict[int, list[dict[str, Any]]] = {}
        self.t_layer = time.perf_counter()

    def __call__(self, job: Job, rows: list[dict[str, Any]]) -> None:
        self.rows.setdefault(job.layer, []).extend(rows)
        if self.bar is not None:
            self.bar.update(len(job.reps))
        if not job.closes_layer:
            return
        # seconds: the last rank's wall time since the previous layer was done (the ranks overlap)
        now, done = time.perf_counter(), self.rows.pop(job.layer)
        rec = {"layer": job.layer, "rows": done, "seconds": round(now - self.t_layer, 3),
               "cost": layer_cost(len(done), job.layer, self.num_layers), "inputs_key": self.key}
        self.t_layer = now
        artifact.write_partial(self.out, job.layer, rec)
        self.records[job.layer] = rec
        if self.on_layer is not None:
            self.on_layer(job.layer)


def _score_rank(lib: Library, shard: Shard, ranges: list[range], shared: dict[str, Any], *, progress: bool,
                on_layer: Callable[[int], None] | None) -> tuple[dict[int, dict[str, Any]], float]:
    """This rank's parent pass and its part of every job: (the records it scored, parent-pass seconds)."""
    config, todo = shared["config"], shared["todo"]
    t0 = time.perf_counter()
    runner = ParentRunner(load_rank_parent(lib, shard, initial=config.initial), head_chunk=config.head_chunk)
    cache = parent_pass(runner, shard, shared["ids"], set(todo) & set(shard.layers))
    parent_seconds = time.perf_counter() - t0
    jobs = schedule(lib, todo, config)
    bar = tqdm(total=sum(len(j.reps) for j in jobs), desc="score", unit="block", disable=not (progress and shard.last))
    collect = LayerRecords(shared["out"], shared["key"], lib.parent_config.num_hidden_layers, bar=bar,
                           on_layer=on_layer)
    owners = {l: r for r, rng in enumerate(ranges) for l in rng}
    run_jobs(lib, runner, shard, cache, jobs, owners, config, collect)
    bar.close()
    return collect.records, parent_seconds


def score_library_sharded(library: str | Path, out_dir: str | Path, config: ScoreConfig | None = None, *,
                          force: bool = False, progress: bool = True,
                          on_layer: Callable[[int], None] | None = None) -> ScoreResult:
    """:func:`~puzzle.scoring.replace1.score_library` with the layers sharded over this process group's
    ranks (``torchrun``; one process without it). ``on_layer(layer)`` runs on the last rank after the
    layer's record is saved. Every rank returns the same result."""
    t_start = time.perf_counter()
    lib = Library(library)  # every rank: the index and the parent's config (small)
    L = lib.parent_config.num_hidden_layers
    costs, world = score_layer_costs(lib.parent_config), int(os.environ.get("WORLD_SIZE", "1"))
    if world > L:
        raise ConfigError(f"{world} processes but the parent has {L} layers; score with at most {L} processes")
    shard = init_shard(costs)
    run, shared = _open(library, out_dir, config, shard, force)
    if isinstance(shared, ScoreResult):
        return shared
    ranges = split_layers(costs, world)
    log.info("rank %d of %d scores through layers %d..%d on %s", shard.rank, world, shard.layers.start,
             shard.layers.stop - 1, shard.device)
    records, parent_seconds = {}, 0.0
    if shared["todo"]:
        records, parent_seconds = _score_rank(lib, shard, ranges, shared, progress=progress, on_layer=on_layer)
    stats = {"peak_rss_bytes": peak_rss_bytes(), "parent_seconds": parent_seconds}
    if shard.device.type == "cuda":
        stats["peak_device_bytes"] = torch.cuda.max_memory_allocated(shard.device)
    gathered = shard.gather((records, stats))
    result = None
    if shard.first:
        assert run is not None and gathered is not None
        for recs, _ in gathered:
            run.records.update(recs)
        st = [s for _, s in gathered]
        shards = {"world_size": world, "device": shard.device.type, "layers": [[r.start, r.stop] for r in ranges],
                  "peak_rss_mib": [round(s["peak_rss_bytes"] / 2**20) for s in st]}
        if "peak_device_bytes" in st[0]:
            shards["peak_device_mib"] = [round(s["peak_device_bytes"] / 2**20) for s in st]
        result = finish(run, wall=time.perf_counter() - t_start, parent_seconds=max(s["parent_seconds"] for s in st),
                        computed=len(shared["todo"]), peak_mib=max(s["peak_rss_bytes"] for s in st) / 2**20,
                        extra={"shards": shards})
    return shard.broadcast(result)
