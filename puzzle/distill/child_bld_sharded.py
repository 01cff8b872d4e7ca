"""Child-aware BLD and its child-stream refit with the layers split over the ``torchrun`` ranks.

    # every rank, the same ids:
    result = train_child_sharded((library, blocks), parent_dir, ids, ChildBLDConfig(tokens=65536, refit=True),
                                 "run/child_bld/child", directory="run/child_bld")

One process holds parent and child whole (:func:`puzzle.distill.child_bld.train_child_blocks`). Here rank ``r``
holds only the layers ``layer_ranges(child, world)[r]`` of both (the child's read from the library's variant files
or an assembled directory, the parent's from its directory; rank 0 also the child's embedding, and the parent's
when the refit blends in the parent's own stream). Child-aware BLD's losses are local to a sub-block (the stream
is detached between sub-blocks) and the refit goes layer by layer, so both split by layer::

    refit (sequential)   rank 0: embed; refit its layers on all N sequences -> send the streams -> rank 1: ...
    step s (pipelined)   rank 0: embed ids_s, train its layers -> send x_s -> rank 1: train its layers -> ...
                         each rank then clips and steps its own AdamW; rank 0 is already on step s + 1

Every tensor goes through the functions of the one-process path (:func:`~puzzle.distill.child_refit.refit_layers`,
:func:`~puzzle.distill.child_bld.step_layers`) in the same shapes and order, with the same learning-rate schedule
and per-sub-block clip, so 1 and W ranks give the same weights (to float rounding) and one rank gives
``train_child_blocks``'s. The streams stop at the rank holding the last layer that changes (later ranks idle).

Checkpoints, the ranks' trained tensors and the runtime directory rank 0 writes: :mod:`puzzle.distill.child_bld_files`.
An error on one rank (a NaN loss, a bad file) is raised on every rank at the next exchange (after loading, after
the refit, at the end): until then the failed rank passes zeros on, so no rank waits for it forever.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from block_library.distributed import Shard, init_shard
from puzzle.distill.child_bld import (ChildBLDConfig, ChildBLDResult, _fingerprint, _mean_nmse, step_context,
                                      step_layers)
from puzzle.distill.child_bld_files import (Reader, agree, all_ranks, raise_any, rank_file, resume_step,
                                            slot_root, subblock_tensors, write_child)
from puzzle.distill.child_refit import RefitResult, check_refit, refit_context, refit_layers, refit_todo
from puzzle.distill.subblocks import SUBBLOCKS, replaced_subblocks
from puzzle.distill.teacher_sharded import layer_ranges
from puzzle.errors import ConfigError
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


def _place(model: Any, layers: range, embed: bool, device: torch.device) -> Any:
    """``model``'s real parts (its ``layers``, the RoPE table, the embedding when read) on ``device``."""
    body = model.model
    for m in [body.layers[l] for l in layers] + [body.rotary_emb] + ([body.embed_tokens] if embed else []):
        m.to(device)
    return model.eval().requires_grad_(False)


def train_child_sharded(child: Any, parent: Any, ids: torch.Tensor, config: ChildBLDConfig, out_dir: str | Path, *,
                        directory: str | Path, progress: bool = False, on_step: Callable[[int], None] | None = None,
                        device: str = "auto") -> ChildBLDResult:
    """Child-aware BLD (and with ``config.refit`` the refit first) of ``child`` against ``parent`` (a model
    directory) on ``ids`` (N, seq_len), the same on every rank, with the layers split over this process group's ranks
    (one process without ``torchrun``). Writes the trained child to ``out_dir`` (a runtime directory, atomically;
    rank 0), checkpoints, the ranks' tensors and ``losses.csv`` to ``directory``. ``child``: ``(library, blocks)`` or
    a model directory. Every rank returns the same summary (``model`` is ``out_dir``); ``on_step(step)`` runs on
    every rank after each step (tests interrupt there); ``progress``: rank 0's wish, the bar on the last busy rank."""
    n_rows = config.steps * config.step_batch
    if ids.dim() != 2 or ids.shape[0] < n_rows or ids.shape[1] != config.seq_len:
        raise ConfigError(f"child-aware BLD needs ({n_rows}, {config.seq_len}) token ids, got {tuple(ids.shape)}")
    ids, directory, out_dir = ids[:n_rows], Path(directory), Path(out_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shard = init_shard([1.0] * world, device=device)  # joins the group; the layers come from layer_ranges
    progress = bool(shard.broadcast(progress))
    child_config, read = child_reader(child)
    shard = dataclasses.replace(shard, layers=layer_ranges(child_config, world)[shard.rank])
    mine, theirs = agree(shard, lambda: _load(read, parent, shard, config.refit and config.refit_drift > 0))
    parts = replaced_subblocks(mine, theirs)  # every rank: the configs are whole
    refit = None
    if config.refit and parts:
        check_refit(ids, ridge=config.refit_ridge, drift=config.refit_drift, batch=config.batch)
        refit, error = _refit(mine, theirs, shard, ids, config, progress)
        raise_any(shard, error)
        refit = _merged_refit(all_ranks(shard, refit))
    state = _Training(shard, config, mine, theirs, parts, directory, ids)  # after the refit: its weights' fingerprint
    start = state.resume()
    state.run(ids, start, progress, on_step)
    raise_any(shard, state.error)
    agree(shard, state.save_tensors)
    everyone = all_ranks(shard, (state.rows, state.seconds))
    rows = sorted((r for rows, _ in everyone for r in rows), key=_row_order)
    del mine, theirs, state
    release_memory()
    from puzzle.distill.sharding import on_rank0

    on_rank0(lambda: _write(out_dir, directory, child_config, read, rows if parts else None, world),
             shard if world > 1 else None)
    keys, q = [f"L{l:03d}.{sub}" for l, sub in parts], max(1, config.steps // 4)  # as train_child_blocks: quarters
    return ChildBLDResult(model=out_dir, trained=keys, steps=config.steps if keys else 0,
                          tokens=(config.steps - start) * config.step_batch * config.seq_len if keys else 0,
                          seconds=max(s for _, s in everyone), first_nmse=_mean_nmse(rows, range(q)),
                          last_nmse=_mean_nmse(rows, range(config.steps - q, config.steps)),
                          refit=refit.summary() if refit is not None else {})


def _load(read: Reader, parent: Any, shard: Shard, drift: bool) -> tuple[Any, Any]:
    """This rank's layers of the child (rank 0: its embedding) and of the parent (rank 0 with ``drift``: its
    embedding, for the refit's parent stream), on the rank's device."""
    from puzzle.loading import load_layers

    log.info("rank %d of %d: the child's and the parent's layers %s", shard.rank, shard.world, list(shard.layers))
    mine = _place(read(shard.layers, shard.first, False), shard.layers, shard.first, shard.device)
    theirs = load_layers(parent, list(shard.layers), embed=shard.first and drift)
    return mine, _place(theirs, shard.layers, shard.first and drift, shard.device)


def _write(out_dir: Path, directory: Path, config: Any, read: Reader, rows: list[dict[str, Any]] | None,
           world: int) -> None:
    """Rank 0: ``losses.csv`` (the rows of every rank, in one process's order) and the child's directory."""
    if rows is not None:
        import pandas as pd

        from puzzle.io import atomic_write_text

        atomic_write_text(directory / "losses.csv",
                          pd.DataFrame(rows, columns=["step", "subblock", "train_nmse", "lr"]).to_csv(index=False))
    files = [rank_file(directory, r) for r in range(world) if rank_file(directory, r).is_file()]
    write_child(out_dir, config, read, files)


def _row_order(row: dict[str, Any]) -> tuple[int, int, int]:
    """The rows of one process: by step, then layer, attention before FFN."""
    layer, sub = row["subblock"].split(".")
    return row["step"], int(layer[1:]), list(SUBBLOCKS).index(sub)


@torch.no_grad()
def _refit(mine: Any, theirs: Any, shard: Shard, ids: torch.Tensor, config: ChildBLDConfig, progress: bool
           ) -> tuple[RefitResult, BaseException | None]:
    """This rank's part of the refit: the streams entering its layers (embedded on rank 0, received elsewhere),
    its layers refit (``refit_layers``), the streams sent on while a later rank has layers to refit."""
    todo = refit_todo(mine, theirs)
    result = RefitResult(layers=todo, tokens=ids.numel(), seconds=0.0)
    if not todo or shard.layers.start > todo[-1]:
        return result, None
    t0 = time.perf_counter()
    (N, T), B, H = ids.shape, config.batch, int(mine.config.hidden_size)
    drift, dtype = config.refit_drift, torch.float32
    if shard.first:
        chunks = [ids[i:i + B].to(shard.device) for i in range(0, N, B)]
        stream = [mine.model.embed_tokens(c) for c in chunks]  # (b, T, H)
        pstream = [theirs.model.embed_tokens(c) for c in chunks] if drift else []
    else:
        stream, pstream = [], []
        for i in range(0, N, B):  # in the order they are sent: the child's chunk, then the parent's
            stream.append(shard.recv((min(B, N - i), T, H), dtype))
            pstream += [shard.recv((min(B, N - i), T, H), dtype)] if drift else []
    error = None
    try:
        stream, pstream = refit_layers(mine, theirs, shard.layers, stream, pstream, refit_context(mine.model, T,
                                       shard.device), todo, ridge=config.refit_ridge, drift=drift,
                                       select=config.refit_select, result=result, progress=progress)
    except Exception as e:  # noqa: BLE001 - raised on every rank after the refit; the next rank waits for streams
        error = e
        stream, pstream = [torch.zeros_like(x) for x in stream], [torch.zeros_like(p) for p in pstream]
    if shard.layers.stop <= todo[-1]:
        for i, x in enumerate(stream):
            shard.send(x)
            if drift:
                shard.send(pstream[i])
    result.seconds = time.perf_counter() - t0
    return result, error


def _merged_refit(results: list[RefitResult]) -> RefitResult:
    """The ranks' refit results as one: every layer's errors; the time of the rank that finished last."""
    out = RefitResult(layers=results[0].layers, tokens=results[0].tokens, seconds=max(r.seconds for r in results))
    for r in results:
        out.error_before.update(r.error_before)
        out.error_after.update(r.error_after)
    return out


class _Training:
    """One rank's share of the training steps: its trained sub-blocks, their AdamW, checkpoints and loss rows."""

    def __init__(self, shard: Shard, config: ChildBLDConfig, mine: Any, theirs: Any, parts: list[tuple[int, str]],
                 directory: Path, ids: torch.Tensor) -> None:
        self.shard, self.config, self.mine, self.theirs, self.directory = shard, config, mine, theirs, directory
        self.named = {f"L{l:03d}.{sub}": (l, sub) for l, sub in parts if l in shard.layers}
        self.modules = {k: nn.ModuleDict({name: getattr(mine.model.layers[l], name) for name in SUBBLOCKS[sub]})
                        for k, (l, sub) in self.named.items()}
        groups = [{"params": list(m.parameters())} for m in self.modules.values()]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0) if groups else None
        # what the run starts from on every rank (a collective): a checkpoint of other weights or splits is not resumed
        fingerprints = all_ranks(shard, _fingerprint(config, list(self.named), self.modules, ids))
        self.tag = hashlib.sha256(json.dumps(fingerprints).encode()).hexdigest()
        self.need = max((l for l, _ in parts), default=-1)  # the last layer with a trained sub-block
        self.layers = range(shard.layers.start, min(shard.layers.stop, self.need + 1))  # what this rank runs
        self.rows: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.ctx: dict[str, Any] = {}

    def resume(self) -> int:
        """The step to start from (0: none), the weights, AdamW state and rows of its checkpoint loaded (a
        collective)."""
        from block_library import checkpoint

        start = resume_step(self.shard, self.directory, self.tag, bool(self.named)) if self.need >= 0 else 0

        def load() -> None:
            if start and self.optimizer is not None:
                root = slot_root(self.directory, self.shard.rank, start, self.config.checkpoint_every)
                self.rows = checkpoint.load_layer(root, start, self.shard.layers.start, self.modules,
                                                  self.optimizer).get("losses", [])

        agree(self.shard, load)
        return start

    def run(self, ids: torch.Tensor, start: int, progress: bool, on_step: Callable[[int], None] | None) -> None:
        """Steps ``start`` to the last: the stream in (embedded on rank 0), this rank's layers trained, the stream
        out, then its AdamW step; a checkpoint every ``checkpoint_every`` steps and after the last."""
        cfg, shard, body = self.config, self.shard, self.mine.model
        B, T, H = cfg.step_batch, cfg.seq_len, int(self.mine.config.hidden_size)
        busy, sends = len(self.layers) > 0, shard.layers.stop <= self.need
        self.ctx = step_context(body, B, T, shard.device)
        for m in self.modules.values():
            m.requires_grad_(True)
            m.train()
        t0 = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=start, desc="child BLD", unit="step",
                   disable=not (progress and busy and not sends))
        try:
            for step in range(start, cfg.steps if self.need >= 0 else 0):
                if busy:
                    with torch.no_grad():
                        x = (body.embed_tokens(ids[step * B:(step + 1) * B].to(shard.device)) if shard.first
                             else shard.recv((B, T, H), torch.float32))  # (B, T, H)
                    losses, out = self._forward(x)
                    if sends:  # before this rank's update: the next one starts at once
                        shard.send(out if out is not None else torch.zeros_like(x))
                    self._update(step, losses)
                    bar.update(1)
                    bar.set_postfix(nmse=f"{sum(losses.values()) / max(1, len(losses)):.4f}")
                if self.error is None and self.optimizer is not None and ((step + 1) % cfg.checkpoint_every == 0
                                                                          or step + 1 == cfg.steps):
                    self._checkpoint(step + 1)
                if on_step is not None:
                    on_step(step)
        finally:
            bar.close()
            for m in self.modules.values():
                m.requires_grad_(False)
                m.eval()
        self.seconds = time.perf_counter() - t0

    def _forward(self, x: torch.Tensor) -> tuple[dict[str, float], torch.Tensor | None]:
        """This rank's layers on the stream ``x``, their gradients accumulated: the losses and the stream out (None
        after an error, kept for the end: until then this rank passes zeros on)."""
        if self.error is None:
            try:
                return step_layers(self.mine, self.theirs, self.layers, x, self.ctx, self.named)
            except Exception as e:  # noqa: BLE001 - raised on every rank at the end
                self.error = e
        return {}, None

    def _update(self, step: int, losses: dict[str, float]) -> None:
        """Clip each sub-block's gradient, step AdamW at the step's learning rate, record the losses."""
        cfg, optimizer = self.config, self.optimizer
        if self.error is not None or optimizer is None:
            return
        lr = cfg.lr_at(step, cfg.steps)
        for m in self.modules.values():  # one norm per sub-block
            cfg.clip(m.parameters())
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.rows += [{"step": step, "subblock": k, "train_nmse": v, "lr": lr} for k, v in losses.items()]

    def _checkpoint(self, step: int) -> None:
        """Weights, AdamW state and rows after ``step`` steps, in the root of its turn (a failed write is raised on
        every rank at the end)."""
        from block_library import checkpoint

        root = slot_root(self.directory, self.shard.rank, step, self.config.checkpoint_every)
        try:
            checkpoint.save_layer(root, step, self.shard.layers.start, self.modules, self.optimizer,
                                  {"losses": self.rows})
            checkpoint.commit(root, step, self.tag)
        except Exception as e:  # noqa: BLE001
            self.error = e

    def save_tensors(self) -> None:
        """This rank's trained sub-blocks' tensors by runtime name (a file; none when it trains none)."""
        path = rank_file(self.directory, self.shard.rank)
        path.unlink(missing_ok=True)  # a file of another split, left by an earlier run
        if self.modules:
            from block_library.artifact import write_state

            write_state(subblock_tensors(self.modules, self.named), path)
