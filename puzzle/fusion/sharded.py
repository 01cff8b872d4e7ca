"""The fusion stage with the child's layers sharded over ``torchrun`` ranks, from model directories.

    torchrun --nproc-per-node 8 fuse.py        # every rank runs:
    result = fuse_sharded("runs/x/child_bld/child", tokenizer, FusionConfig(threshold=0.1), "runs/x/fuse/fusion",
                          parent="models/llama-3.1-70b")
    result.segments        # the same segments, report and fused weights as fuse_and_report on one process

For a child too large for one device (a 70B child is 140 GB in bf16). No rank ever holds a whole
model: each owns a contiguous run of the child's layers (:func:`block_library.distributed.split_layers`
on the layers' parameters) and reads only those from the child's directory
(:func:`puzzle.loading.load_layers`); rank 0 also the embedding, the last rank the final norm, the
head and every reference log-prob. Hidden states flow rank to rank (``send``/``recv``; gloo on CPU,
NCCL on GPU), as in BLD's teacher pass. With one process (no torchrun) the same code runs whole.

    1. parent (optional): its layers split the same way, one pipelined pass over the held-out ids
       in chunks of 2; the last rank keeps the parent's log-probs; the parent is freed.
    2. calibration: one pipelined pass over all calibration sequences at once; each rank keeps the
       residual stream entering each of its runs. Runs are the attention-free SwiGLU runs *cut at
       rank boundaries* (:func:`~puzzle.fusion.runs.split_at_ranks`): a run whose layers straddle
       two ranks is analyzed and fused as two pieces, so a segment never spans ranks (a piece of one
       layer is not fusable). Forced ``segments`` are cut the same way. Where no run straddles a
       boundary, the result is the one-process result.
    3. dependencies (:func:`~puzzle.fusion.dependency.run_dependency`) on the rank owning the run;
       gathered to rank 0, which chooses the segments (:func:`~puzzle.fusion.pipeline.choose_fused`)
       and broadcasts them.
    4. the unfused child's reference log-probs (pipelined, kept on the last rank), then per chosen
       segment one pipelined pass with that segment fused on its owner: the KL guard. Rank 0 builds
       the rows (:func:`~puzzle.fusion.pipeline.segment_row`) and broadcasts the segments kept.
    5. the owners fuse the kept segments (freeing the members), one pass for the ``all`` row,
       optional distillation of each fused block on its owner, one pass for ``all (distilled)``.
    6. each rank writes its layers (renumbered) as one safetensors file of the fused runtime
       directory ``out/model`` (rank 0 the embedding, the last rank the norm and head); rank 0 the
       shard index, ``config.json`` and the report files of :func:`~puzzle.fusion.artifact.write_fusion`.

Every tensor goes through the same functions in the same shapes as in :func:`fuse_and_report`
(the calibration pass takes all sequences at once, evaluation 2 at a time), so the numbers match it.
Measured latency needs the whole model on one device: only predicted latency is reported here.
Memory per rank: :func:`puzzle.fusion.memory.fuse_rank_bytes`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from block_library.distributed import Shard, init_shard, split_layers
from puzzle.data.packing import load_sequences
from puzzle.errors import ConfigError
from puzzle.fusion.artifact import write_fusion_files
from puzzle.fusion.dependency import RunDependency, parallel_error, run_dependency
from puzzle.fusion.distill import distill_fused_block
from puzzle.fusion.fuse import sequential_reference
from puzzle.fusion.memory import EVAL_CHUNK, fuse_layer_costs
from puzzle.fusion.pipelined import Judge, RankModel
from puzzle.fusion.pipeline import FusionConfig, choose_fused, model_rows, predicted_latency_rows, segment_row
from puzzle.fusion.runs import Segment, check_segments, find_runs, fused_blocks, split_at_ranks
from puzzle.io import atomic_write_json, copy_tokenizer_files, replace_directory, save_safetensors_streamed
from puzzle.loading import Source, load_config, resolve_source, runtime_config_dict
from puzzle.model import PuzzleConfig
from puzzle.peak import peak_rss_bytes, release_memory, reset_peak, rss_bytes

log = logging.getLogger(__name__)



@dataclass
class ShardedFusion:
    """What :func:`fuse_sharded` returns on every rank (the fused model itself is only on disk)."""

    directory: Path
    """The output directory; ``directory / "model"`` is the fused runtime model."""
    segments: list[Segment]
    dependencies: list[RunDependency]
    report: pd.DataFrame
    latency: pd.DataFrame
    distill_losses: dict[str, list[float]]
    shards: dict[str, Any]
    """world_size, device, each rank's child layers and peak RSS (MiB)."""

    @property
    def model_dir(self) -> Path:
        return self.directory / "model"


def _open(shard: Shard, tokenizer: Any, cfg: FusionConfig, out_dir: Path, overwrite: bool
          ) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Rank 0 checks the output directory, makes its temporary sibling and reads the ids; every rank
    learns them (or rank 0's error, raised everywhere)."""
    shared: Any = None
    if shard.first:
        try:
            if out_dir.exists() and not out_dir.is_dir():
                raise FileExistsError(f"{out_dir} exists and is not a directory")
            if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
                raise FileExistsError(f"{out_dir} already exists and is not empty; choose another path or overwrite it")
            calib = load_sequences(list(cfg.sources), tokenizer, seq_len=cfg.seq_len, num_sequences=cfg.calib_sequences)
            heldout = load_sequences(list(cfg.sources), tokenizer, seq_len=cfg.seq_len,
                                     num_sequences=cfg.eval_sequences, split="validation")
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
            (tmp / "model").mkdir()
            shared = (tmp, calib, heldout)
        except Exception as e:  # every rank raises it, not only rank 0
            shared = e
    shared = shard.broadcast(shared)
    if isinstance(shared, Exception):
        raise shared
    return shared


def _parent_reference(parent: str | Path | Source, shard: Shard, ids: torch.Tensor, *, dtype: torch.dtype
                      ) -> list[torch.Tensor] | None:
    """The parent's log-probs on ids in chunks (last rank; None elsewhere), from its layers split over the
    ranks; the parent is freed before returning."""
    pconfig = load_config(parent)
    costs = fuse_layer_costs(pconfig)
    if shard.world > len(costs):
        raise ConfigError(f"{shard.world} processes but the parent has {len(costs)} layers; use at most {len(costs)}")
    part = RankModel(parent, split_layers(costs, shard.world)[shard.rank], shard, dtype=dtype)
    chunks: list[torch.Tensor] = []
    part.run(ids, chunk=EVAL_CHUNK, on_logprobs=lambda k, lp: chunks.append(lp))
    del part
    release_memory()
    return chunks if shard.last else None


def _choose(shard: Shard, config: PuzzleConfig, local: list[RunDependency], cfg: FusionConfig
            ) -> tuple[list[Segment], list[RunDependency]]:
    """Every rank's dependencies to rank 0, which chooses; the segments on every rank (the dependencies on rank 0)."""
    gathered = shard.gather(local)
    deps: list[RunDependency] = []
    segments = None
    if shard.first:
        assert gathered is not None
        deps = sorted((d for part in gathered for d in part), key=lambda d: d.run.start)
        segments = choose_fused(config, deps, cfg)
    return shard.broadcast(segments), deps


def _guard(part: RankModel, judge: Judge, segments: list[Segment], owners: dict[int, int], runs: list[Segment],
           inputs: dict[int, torch.Tensor], *, progress: bool) -> tuple[dict[Segment, float], dict[Segment, dict]]:
    """Per chosen segment: its parallel error (owner) and the quality of fusing it alone (last rank)."""
    errors, qualities = {}, {}
    for seg in _bar(segments, "fused segments", part.shard, progress):
        if owners[seg.start] == part.shard.rank:
            errors[seg] = parallel_error(part.model, seg, part.stream_at(runs, inputs, seg.start))
            part.fused = {seg.start: (seg, part.fuse(seg))}
        q = judge.quality(part, to_parent=False)
        part.fused = {}
        if q is not None:
            qualities[seg] = q
    return errors, qualities


def _fuse_kept(part: RankModel, kept: list[Segment], runs: list[Segment], inputs: dict[int, torch.Tensor], *,
               distill: bool) -> dict[Segment, tuple[torch.Tensor, torch.Tensor]]:
    """Fuse this rank's kept segments (their members go to the meta device); with ``distill`` first keep
    each one's calibration input and sequential output, the distillation's data."""
    data = {}
    if distill:
        for seg in kept:
            x0 = part.stream_at(runs, inputs, seg.start)
            with torch.no_grad():
                data[seg] = (x0, sequential_reference(part.model, seg, x0))
    for seg in kept:
        part.fused[seg.start] = (seg, part.fuse(seg))
        for i in seg.layers:
            part.model.model.layers[i].to("meta")  # frees the members
    return data


def _rows(shard: Shard, config: PuzzleConfig, segments: list[Segment], deps: list[RunDependency], cfg: FusionConfig,
          errors: dict[Segment, float], qualities: dict[Segment, dict]) -> tuple[list[dict[str, Any]], list[Segment]]:
    """Rank 0 builds the segments' report rows (the KL guard decides there); the segments kept, on every rank."""
    gathered = shard.gather((errors, qualities))
    rows: list[dict[str, Any]] = []
    if shard.first:
        assert gathered is not None
        errs = {k: v for e, _ in gathered for k, v in e.items()}
        quals = {k: v for _, q in gathered for k, v in q.items()}
        rows = [segment_row(config, s, deps, cfg, parallel_error=errs[s], quality=quals[s]) for s in segments]
    kept = shard.broadcast([s for s, r in zip(segments, rows) if r["fused"]] if shard.first else None)
    return rows, kept


def _cut_runs(shard: Shard, config: PuzzleConfig, ranges: list[range], cfg: FusionConfig
              ) -> tuple[list[Segment], FusionConfig]:
    """The runs cut at rank boundaries, and ``cfg`` with its forced segments cut alike (logged on rank 0)."""
    whole = find_runs(config.blocks)
    runs = split_at_ranks(whole, ranges)
    forced = None if cfg.segments is None else split_at_ranks(check_segments(config.blocks, cfg.segments), ranges)
    if shard.first:
        if not whole:
            log.warning("no run of two or more attention-free SwiGLU layers: nothing to fuse")
        for name, before in (("run", whole), ("segment", cfg.segments or ())):
            for s in before:
                pieces = [p.label for p in split_at_ranks([s], ranges)]
                if pieces != [s.label]:
                    log.warning("%s %s spans ranks: analyzed and fused as %s (segments never span ranks)",
                                name, s.label, pieces or "nothing")
    return runs, (cfg if forced is None else dataclasses.replace(cfg, segments=tuple(forced)))


def _bar(items: Sequence[Any], desc: str, shard: Shard, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not (progress and shard.first))


def _write_rank(part: RankModel, fused: Sequence[Segment], model_dir: Path) -> dict[str, Any]:
    """This rank's tensors (``fused``: every rank's fused segments) as one safetensors file in
    ``model_dir``, written one tensor at a time; returns {file, names, bytes} for the shard index."""
    shard = part.shard
    name = "model.safetensors" if shard.world == 1 else f"model-{shard.rank + 1:05d}-of-{shard.world:05d}.safetensors"
    state = part.state(fused)
    specs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    scratch = model_dir / f".rank{shard.rank}"
    save_safetensors_streamed(specs, lambda k: state[k], scratch, max_shard_bytes=2**62)  # one file
    os.replace(scratch / "model.safetensors", model_dir / name)
    shutil.rmtree(scratch)
    return {"file": name, "names": sorted(state), "bytes": sum(v.numel() * v.element_size() for v in state.values())}


def _write_model_files(model_dir: Path, config: PuzzleConfig, files: list[dict[str, Any]],
                       tokenizer_dir: str | Path | None) -> None:
    """Rank 0: the shard index (several files), ``config.json`` and the tokenizer files of the runtime directory."""
    if len(files) > 1:
        atomic_write_json(model_dir / "model.safetensors.index.json", {
            "metadata": {"total_size": sum(f["bytes"] for f in files)},
            "weight_map": {k: f["file"] for f in files for k in f["names"]}})
    atomic_write_json(model_dir / "config.json", runtime_config_dict(config))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, model_dir)


def _finish_directory(tmp: Path, out_dir: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp creates 0700
    replace_directory(tmp, out_dir)


def fuse_sharded(child: str | Path | Source, tokenizer: Any, cfg: FusionConfig | None, out_dir: str | Path, *,
                 parent: str | Path | Source | None = None, source: str | None = None,
                 tokenizer_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
                 dtype: torch.dtype = torch.float32, device: str = "auto") -> ShardedFusion:
    """The fusion stage on ``child`` (a model directory, e.g. a runtime directory ``save_runtime`` wrote),
    sharded over this process group's ranks (``torchrun``; one process without it); see the module docstring.

    ``tokenizer`` is used on rank 0 only. ``parent``: the model directory (or embedded name) the child was
    derived from: the report then has ``kl_to_parent``. Writes ``out_dir`` as
    :func:`~puzzle.fusion.artifact.write_fusion` does, the model as a runtime directory (``out_dir/model``,
    one safetensors file per rank and a shard index), atomically: complete or absent. ``source``: the
    name the manifest records (default: the child's); ``tokenizer_dir``: whose tokenizer files join the
    model (default: the child's, where it has them). ``dtype``: the compute and stored dtype (float32
    reproduces :func:`~puzzle.fusion.pipeline.fuse_and_report` on a float32 child). ``device``: ``auto``
    (each rank's GPU when CUDA is there), ``cpu`` or ``cuda``. Every rank returns the same result.
    """
    t_start = time.perf_counter()
    reset_peak()
    start_rss = rss_bytes()
    cfg, out_dir, child = cfg or FusionConfig(), Path(out_dir), resolve_source(child)
    config = load_config(child)
    if cfg.segments is not None:
        check_segments(config.blocks, cfg.segments)
    costs, world = fuse_layer_costs(config), int(os.environ.get("WORLD_SIZE", "1"))
    if world > len(costs):
        raise ConfigError(f"{world} processes but the child has {len(costs)} layers; fuse with at most {len(costs)}")
    shard = init_shard(costs, device=device)
    ranges = split_layers(costs, world)
    tmp, calib, heldout = _open(shard, tokenizer, cfg, out_dir, overwrite)
    try:
        result = _fuse(child, shard, ranges, config, cfg, calib, heldout, tmp, parent=parent, progress=progress,
                       dtype=dtype, tokenizer_dir=tokenizer_dir, source=source or child.name, start_rss=start_rss)
        if shard.first:
            _finish_directory(tmp, out_dir)
    except BaseException:
        if shard.first:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = shard.broadcast(dataclasses.replace(result, directory=out_dir) if shard.first else None)
    log.info("sharded fusion over %d ranks: %s in %.0f s", world, [s.label for s in result.segments],
             time.perf_counter() - t_start)
    return result


def _fuse(child: Source, shard: Shard, ranges: list[range], config: PuzzleConfig, cfg: FusionConfig,
          calib: torch.Tensor, heldout: torch.Tensor, tmp: Path, *, parent: str | Path | Source | None, progress: bool,
          dtype: torch.dtype, tokenizer_dir: str | Path | None, source: str, start_rss: int) -> ShardedFusion | None:
    """Steps 1-6 of the module docstring; the result on rank 0 (None elsewhere)."""
    runs, local_cfg = _cut_runs(shard, config, ranges, cfg)
    owners = {l: r for r, rng in enumerate(ranges) for l in rng}
    mine = [r for r in runs if owners[r.start] == shard.rank]
    to_parent = _parent_reference(parent, shard, heldout, dtype=dtype) if parent is not None else None
    part = RankModel(child, ranges[shard.rank], shard, dtype=dtype)
    inputs = part.run(calib, chunk=calib.shape[0], keep={r.start for r in mine})  # all at once, as run_inputs
    deps = [run_dependency(part.model, r, inputs[r.start]) for r in _bar(mine, "dependency", shard, progress)]
    segments, deps = _choose(shard, config, deps, local_cfg)
    judge = Judge(heldout, shard, to_parent)
    unfused_to_parent = judge.reference_pass(part)
    errors, qualities = _guard(part, judge, segments, owners, mine, inputs, progress=progress)
    rows, kept = _rows(shard, config, segments, deps, local_cfg, errors, qualities)
    distill = bool(kept and cfg.distill_steps)
    data = _fuse_kept(part, [s for s in kept if owners[s.start] == shard.rank], mine, inputs, distill=distill)
    del inputs
    fused_quality, distilled, losses = judge.quality(part, to_parent=True), None, {}
    if distill:
        for seg, (x0, target) in data.items():
            block = part.fused[seg.start][1]
            losses[seg.label] = distill_fused_block(block, x0, target, steps=cfg.distill_steps, lr=cfg.distill_lr)
        data.clear()
        distilled = judge.quality(part, to_parent=True)
    written = _write_rank(part, kept, tmp / "model")
    stats = {"layers": [part.layers.start, part.layers.stop], "peak_rss_bytes": peak_rss_bytes(),
             "start_rss_bytes": start_rss}
    if shard.device.type == "cuda":
        stats["peak_device_bytes"] = torch.cuda.max_memory_allocated(shard.device)
    gathered = shard.gather((losses, written, stats, (unfused_to_parent, fused_quality, distilled)))
    if not shard.first:
        return None
    assert gathered is not None
    losses = {k: v for g in gathered for k, v in g[0].items()}
    unfused_to_parent, fused_quality, distilled = gathered[-1][3]  # the last rank scored them
    report = pd.DataFrame(model_rows(rows, kept, local_cfg, unfused_to_parent=unfused_to_parent, fused=fused_quality,
                                     distilled=distilled))
    fused_config = config.with_blocks(fused_blocks(config.blocks, kept)[0])
    _write_model_files(tmp / "model", fused_config, [g[1] for g in gathered], tokenizer_dir or child.directory)
    if cfg.measure:
        log.info("measured latency needs the whole model on one device: the sharded fusion reports predicted latency")
    latency = pd.DataFrame(predicted_latency_rows(config, fused_config, cfg))
    st = [g[2] for g in gathered]
    shards = {"world_size": shard.world, "device": shard.device.type, "layers": [s["layers"] for s in st],
              "peak_rss_mib": [round(s["peak_rss_bytes"] / 2**20) for s in st],
              "start_rss_mib": [round(s["start_rss_bytes"] / 2**20) for s in st]}
    if "peak_device_bytes" in st[0]:
        shards["peak_device_mib"] = [round(s["peak_device_bytes"] / 2**20) for s in st]
    write_fusion_files(tmp, blocks=fused_config.blocks, report=report, latency=latency, dependencies=deps,
                       segments=kept, config=cfg, source=source, distill_losses=losses, extra={"shards": shards})
    return ShardedFusion(directory=tmp, segments=kept, dependencies=deps, report=report, latency=latency,
                         distill_losses=losses, shards=shards)
