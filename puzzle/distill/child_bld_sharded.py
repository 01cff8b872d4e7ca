"""Child-aware BLD and its child-stream refit with the layers split over the ``torchrun`` ranks, each rank's layers in
rounds that fit its memory.

    # every rank, the same ids:
    result = train_child_sharded((library, blocks), parent_dir, ids, ChildBLDConfig(tokens=65536, refit=True),
                                 "run/child_bld/child", directory="run/child_bld", budget=72e9)

One process holds parent and child whole (:func:`puzzle.distill.child_bld.train_child_blocks`). Here rank ``r``
holds only the layers ``layer_ranges(child, world)[r]`` of both (the child's read from the library's variant files
or an assembled directory, the parent's from its directory; rank 0 also the child's embedding, and the parent's
when the refit blends in the parent's own stream, unless the child comes from the library, whose embedding is the
parent's: then one module serves both). Child-aware BLD's losses are local to a sub-block (the stream
is detached between sub-blocks) and the refit goes layer by layer, so both split by layer::

    refit (sequential)   rank 0: embed; refit its layers on all N sequences -> send the streams -> rank 1: ...
    step s (pipelined)   rank 0: embed ids_s, train its layers -> send x_s -> rank 1: train its layers -> ...
                         each rank then clips and steps its own AdamW; rank 0 is already on step s + 1

A rank whose layers do not fit ``budget`` (the parent's and the child's, AdamW state of the trained sub-blocks)
trains them in *rounds* over *windows* of steps (:mod:`puzzle.distill.child_bld_memory`,
:mod:`puzzle.distill.child_bld_train`), and refits them one layer at a time first
(:mod:`puzzle.distill.child_refit_sharded`); the refit reads at most ``REFIT_MAX_TOKENS`` of the ids.

Every tensor goes through the functions of the one-process path (:func:`~puzzle.distill.child_refit.refit_layers`,
:func:`~puzzle.distill.child_bld.step_layers`) in the same shapes and order, with the same learning-rate schedule
and per-sub-block clip, so 1 and W ranks, in one round or several, give the same weights (to float rounding) and
one rank in one round gives ``train_child_blocks``'s. The streams stop at the rank holding the last layer that
changes (later ranks idle).

Checkpoints, loss rows, the ranks' trained tensors and the runtime directory rank 0 writes:
:mod:`puzzle.distill.child_bld_files`. An error on one rank (a NaN loss, a bad file) is raised on every rank at the
next exchange (after loading, after the refit, at the end): until then the failed rank passes zeros on, so no rank
waits for it forever.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from block_library.distributed import Shard, init_shard
from puzzle.distill.child_bld import ChildBLDConfig, ChildBLDResult, mean_nmse
from puzzle.distill.child_bld_files import (Reader, agree, all_ranks, place, raise_any, rank_file, read_rows, rows_file,
                                            write_child)
from puzzle.distill.child_bld_memory import (WINDOW_BYTES, RankPlan, RefitShape, layer_shape, plan_rank, resume_period,
                                             window_steps)
from puzzle.distill.child_bld_train import Opener, RoundTraining
from puzzle.distill.child_refit import RefitResult, check_refit, refit_ids, refit_todo
from puzzle.distill.child_refit_sharded import merged_refit, refit_by_layer, refit_file, refit_whole
from puzzle.distill.subblocks import SUBBLOCKS, replaced_subblocks
from puzzle.distill.teacher_sharded import layer_ranges
from puzzle.errors import ConfigError
from puzzle.loading import load_layers
from puzzle.peak import release_memory

log = logging.getLogger(__name__)


def child_reader(child: Any) -> tuple[Any, Reader]:
    """The child's config and ``read(layers, embed, head)``: its model with only those parts (the rest on meta).
    ``child``: ``(library, blocks)`` (read from the variant files) or a model directory."""
    if isinstance(child, tuple):
        lib, blocks = child
        return (lib.parent_config.with_blocks(list(blocks)),
                lambda layers, embed, head: lib.assemble_layers(blocks, list(layers), embed=embed, head=head))
    from puzzle.loading import load_config, load_layers, resolve_source

    src = resolve_source(child)
    return load_config(src), lambda layers, embed, head: load_layers(src, list(layers), embed=embed, head=head)


def train_child_sharded(child: Any, parent: Any, ids: torch.Tensor, config: ChildBLDConfig, out_dir: str | Path, *,
                        directory: str | Path, progress: bool = False, on_step: Callable[[int], None] | None = None,
                        device: str = "auto", budget: float | None = None, max_round_layers: int | None = None,
                        window_bytes: float = WINDOW_BYTES) -> ChildBLDResult:
    """Child-aware BLD (and with ``config.refit`` the refit first) of ``child`` against ``parent`` (a model
    directory) on ``ids`` (N, seq_len), the same on every rank, with the layers split over this process group's ranks
    (one process without ``torchrun``). Writes the trained child to ``out_dir`` (a runtime directory, atomically;
    rank 0), checkpoints, the ranks' tensors and ``losses.csv`` to ``directory``. ``child``: ``(library, blocks)`` or
    a model directory. Every rank returns the same summary (``model`` is ``out_dir``); ``on_step(step)`` runs on
    every rank after each step (tests interrupt there); ``progress``: rank 0's wish, the bar on the last busy rank.

    ``budget``: a rank's device bytes; a rank whose layers do not fit trains them in rounds, ``window_bytes`` of
    streams a window (:mod:`puzzle.distill.child_bld_memory`; None: one round). ``max_round_layers``: at most that
    many layers a round (tests). The weights do not depend on either."""
    from puzzle.loading import load_config, resolve_source
    from puzzle.model.weights import meta_model

    n_rows = config.steps * config.step_batch
    if ids.dim() != 2 or ids.shape[0] < n_rows or ids.shape[1] != config.seq_len:
        raise ConfigError(f"child-aware BLD needs ({n_rows}, {config.seq_len}) token ids, got {tuple(ids.shape)}")
    ids, directory, out_dir = ids[:n_rows], Path(directory), Path(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shard = init_shard([1.0] * world, device=device)  # joins the group; the layers come from layer_ranges
    progress = bool(shard.broadcast(progress))
    child_config, read = child_reader(child)
    shard = dataclasses.replace(shard, layers=layer_ranges(child_config, world)[shard.rank])
    metas = meta_model(child_config), meta_model(load_config(resolve_source(parent)))
    parts = replaced_subblocks(*metas)  # every rank: the configs are whole
    run = range(shard.layers.start, min(shard.layers.stop, max((l for l, _ in parts), default=-1) + 1))
    refit_on = config.refit and bool(parts)
    if refit_on:
        check_refit(ids, ridge=config.refit_ridge, drift=config.refit_drift, batch=config.batch)
    todo, rids = refit_todo(*metas) if refit_on else [], refit_ids(ids)
    shared = isinstance(child, tuple)  # a library child: the library's embedding is the parent's
    plan, window = _rank_plan(metas, parts, todo, rids, config, shard, run, budget, max_round_layers, window_bytes,
                              shared)
    layouts = all_ranks(shard, [[r.start, r.stop] for r in plan.rounds])
    windowed = any(len(x) > 1 for x in layouts)
    if windowed:
        log.info("rank %d: layers %s in %d rounds, windows of %d steps", shard.rank, list(run), len(plan.rounds),
                 window)
    drift = refit_on and config.refit_drift > 0
    models = agree(shard, lambda: _load(read, parent, shard, run, drift, shared) if plan.refit_whole else None)
    refit, refitted = (_refit(read, parent, models, shard, rids, config, run, todo, directory,
                              hidden=int(child_config.hidden_size), progress=progress, shared=shared,
                              host=plan.refit_host) if refit_on else (None, []))
    if plan.refit_host or plan.embed_host:
        log.info("rank %d: %s in host RAM", shard.rank, " and ".join(
            ["the refit's Gram and elimination"] * plan.refit_host + ["the embedding"] * plan.embed_host))
    opener = Opener(child=lambda layers, embed: _open_child(read, layers, embed, refitted, directory, shard.device,
                                                            embed_host=plan.embed_host),
                    parent=lambda layers: place(load_layers(parent, layers), layers, False, shard.device),
                    preloaded=models)
    training = RoundTraining(shard, config, directory, ids, plan.rounds, parts, opener,
                             hidden=int(child_config.hidden_size),
                             window=window if windowed else max(1, config.steps),
                             period=resume_period(window, world) if windowed else config.checkpoint_every,
                             windowed=windowed)  # after the refit: its weights' fingerprint
    start = training.resume()
    training.run(ids, start, progress, on_step)
    raise_any(shard, training.error)
    seconds = max(all_ranks(shard, training.seconds))
    del models, opener, training
    release_memory()
    from puzzle.distill.sharding import on_rank0

    first, last = on_rank0(lambda: _write(out_dir, directory, child_config, read, layouts, windowed, parts, config),
                           shard if world > 1 else None)
    keys = [f"L{l:03d}.{sub}" for l, sub in parts]
    return ChildBLDResult(model=out_dir, trained=keys, steps=config.steps if keys else 0,
                          tokens=(config.steps - start) * config.step_batch * config.seq_len if keys else 0,
                          seconds=seconds, first_nmse=first, last_nmse=last,
                          refit=refit.summary() if refit is not None else {})


def _rank_plan(metas: tuple[Any, Any], parts: list[tuple[int, str]], todo: list[int], rids: torch.Tensor,
               config: ChildBLDConfig, shard: Shard, run: range, budget: float | None, max_layers: int | None,
               window_bytes: float, shared: bool) -> tuple[RankPlan, int]:
    """This rank's rounds (:func:`~puzzle.distill.child_bld_memory.plan_rank` for its device) and the steps of a
    window, the same on every rank (``shared``: the child's embedding is the parent's)."""
    child, parent = metas
    shape = layer_shape(parent.config, child.config, parts)
    B, T = config.step_batch, config.seq_len
    window = window_steps(config.steps, config.checkpoint_every, B * T * shape.hidden * 4, window_bytes)
    refit = (RefitShape(tokens=rids.numel(), last=todo[-1], drift=config.refit_drift > 0, select=config.refit_select,
                        chunk_tokens=config.batch * T, shared_embedding=shared, layers=tuple(todo)) if todo else None)
    plan = plan_rank(shape, run, batch=B, seq_len=T, window=window, first=shard.first,
                     cpu=shard.device.type == "cpu", budget=budget, refit=refit, max_layers=max_layers)
    if budget is not None and plan.peak > budget:
        log.warning("rank %d: child-aware BLD needs %.2f GiB, more than its %.2f GiB (a layer alone does not fit)",
                    shard.rank, plan.peak / 2**30, budget / 2**30)
    return plan, window


def _refit(read: Reader, parent: Any, models: tuple[Any, Any] | None, shard: Shard, ids: torch.Tensor,
           config: ChildBLDConfig, run: range, todo: list[int], directory: Path, *, hidden: int, progress: bool,
           shared: bool, host: bool) -> tuple[RefitResult, list[int]]:
    """This rank's part of the refit on ``ids`` (already capped), on the ``models`` it holds or one layer at a time
    (:mod:`puzzle.distill.child_refit_sharded`; ``shared``: the child's embedding serves the parent's stream;
    ``host``: the Gram and elimination in host RAM); any rank's error raised on every rank. Returns every rank's
    result as one and the layers this rank wrote to files."""
    written: list[int] = []
    if models is not None:
        result, error = refit_whole(*models, shard, ids, config, run, todo, progress, host=host)
    else:
        result, error, written = refit_by_layer(read, parent, shard, ids, config, run, todo, directory,
                                                hidden=hidden, progress=progress, shared=shared, host=host)
    raise_any(shard, error)
    return merged_refit(all_ranks(shard, result)), written


def _load(read: Reader, parent: Any, shard: Shard, run: range, drift: bool, shared: bool) -> tuple[Any, Any]:
    """The layers ``run`` of the child (rank 0: its embedding) and of the parent (rank 0 with ``drift``: its
    embedding, for the refit's parent stream: the child's module when ``shared``), on the rank's device."""
    log.info("rank %d of %d: the child's and the parent's layers %s", shard.rank, shard.world, list(run))
    mine = place(read(run, shard.first, False), run, shard.first, shard.device)
    own = shard.first and drift and not shared
    theirs = place(load_layers(parent, list(run), embed=own), run, own, shard.device)
    if shard.first and drift and shared:
        theirs.model.embed_tokens = mine.model.embed_tokens
    return mine, theirs


def _open_child(read: Reader, layers: range, embed: bool, refitted: list[int], directory: Path,
                device: torch.device, *, embed_host: bool = False) -> Any:
    """The child's ``layers`` (and embedding), the FFNs the refit rebuilt one layer at a time read from their
    files, on ``device`` (the embedding left in host RAM with ``embed_host``)."""
    from block_library.artifact import read_state

    model = read(layers, embed, False)
    state = model.state_dict()
    with torch.no_grad():
        for l in (l for l in layers if l in refitted):
            for name, t in read_state(refit_file(directory, l)).items():
                state[name].copy_(t)
    return place(model, layers, embed and not embed_host, device)


def _write(out_dir: Path, directory: Path, config: Any, read: Reader, layouts: list[list[list[int]]], windowed: bool,
           parts: list[tuple[int, str]], cfg: ChildBLDConfig) -> tuple[dict[str, float], dict[str, float]]:
    """Rank 0: ``losses.csv`` (every round's rows, in one process's order) and the child's directory; returns
    each trained sub-block's mean NMSE over the first and the last quarter of the steps."""
    rounds = [(rank, range(a, b)) for rank, layout in enumerate(layouts) for a, b in layout]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    if parts:
        import pandas as pd

        from puzzle.io import atomic_write_text

        rows = sorted((row for _, r in rounds for row in read_rows(rows_file(directory, r))), key=_row_order)
        atomic_write_text(directory / "losses.csv",
                          pd.DataFrame(rows, columns=["step", "subblock", "train_nmse", "lr"]).to_csv(index=False))
        q = max(1, cfg.steps // 4)  # as train_child_blocks: quarters
        first, last = mean_nmse(rows, range(q)), mean_nmse(rows, range(cfg.steps - q, cfg.steps))
    files = [rank_file(directory, rank, r if windowed else None) for rank, r in rounds]
    write_child(out_dir, config, read, [f for f in files if f.is_file()])
    return first, last


def _row_order(row: dict[str, Any]) -> tuple[int, int, int]:
    """The rows of one process: by step, then layer, attention before FFN."""
    layer, sub = row["subblock"].split(".")
    return row["step"], int(layer[1:]), list(SUBBLOCKS).index(sub)
