"""Block-wise local distillation: every variant learns to imitate its parent sub-block.

One parent forward per batch feeds every trainable variant of every layer (teacher forcing,
:mod:`block_library.teacher`). Attention variants learn ``x -> h`` and FFN variants ``h -> y``
independently, so A attention and F FFN variants cost A + F trainings and give A x F blocks.
The loss is the normalized MSE (:mod:`block_library.session`); each layer has its own AdamW and
each variant its own gradient clip, so no variant influences another and the result does not
depend on how layers are split over processes. Checkpoints every ``checkpoint_every`` steps
(:mod:`block_library.checkpoint`) make an interrupted run resume where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from block_library import checkpoint
from block_library.artifact import INDEX, INDEX_COLUMNS, MANIFEST, Library, read_state, write_state
from block_library.config import LibraryConfig
from block_library.distributed import close_shard
from block_library.session import Session, load_ids, nmse_sums, open_session, parent_fingerprint, validate
from block_library.teacher import batches_of, run_pass
from puzzle.errors import CorruptArtifactError, NumericalError
from puzzle.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def lr_at(step: int, total: int, lr: float, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Linear warmup over ``warmup_fraction * total`` steps, then cosine to ``min_lr_ratio * lr``."""
    warm = max(1, round(warmup_fraction * total)) if warmup_fraction > 0 else 0
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class LayerTrainer:
    """The trainable variants of one layer and their optimizer."""

    def __init__(self, layer: int, modules: dict[str, nn.Module], subblocks: dict[str, str],
                 lr_scales: dict[str, float], weight_decay: float) -> None:
        self.layer, self.modules, self.subblocks = layer, modules, subblocks
        # One param group per variant: its own learning-rate multiplier.
        groups = [{"params": list(m.parameters()), "lr_scale": lr_scales[k]} for k, m in modules.items()]
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, weight_decay=weight_decay) if groups else None
        self.losses: dict[str, torch.Tensor] = {}

    def train_on(self, session: Session, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, ctx: dict[str, Any]) -> None:
        for key, m in self.modules.items():
            inp, target = (x, h) if self.subblocks[key] == "attention" else (h, y)
            with session.autocast():
                out = m(inp.float() if session.compute_dtype == torch.float32 else inp, ctx)
            err, energy = nmse_sums(out, target)
            loss = err / energy
            loss.backward()
            self.losses[key] = loss.detach()

    def step(self, lr: float, grad_clip: float) -> None:
        if self.optimizer is None:
            return
        if grad_clip > 0:
            for m in self.modules.values():
                torch.nn.utils.clip_grad_norm_(m.parameters(), grad_clip)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def train_library(directory: str | Path, *, config: LibraryConfig | None = None, progress: bool = True,
                  on_step: Callable[[int], None] | None = None, force: bool = False) -> Path:
    """Run (or resume) BLD on a built library; writes ``trained/``, the index, and the loss logs.

    ``config`` defaults to the library's own; passing one with another ``bld`` section (e.g. more
    tokens) retrains from the initialization. ``on_step(step)`` is called after every step.
    ``force``: train again even if the library says it is trained with this config (a trained file
    was lost or damaged); an interrupted run still resumes from its checkpoint.
    """
    directory = Path(directory).expanduser().resolve()
    lib = Library(directory)
    config = config or lib.config
    if not force and lib.status == "trained" and lib.manifest.get("config_sha256") == config.sha256():
        log.info("%s is already trained with this config; nothing to do", directory)
        return directory
    session = _open_checked(lib, config)
    shard, bld = session.shard, config.bld
    trainers = _load_trainers(session, lib)
    ckpt_root, cfg_hash = directory / "bld" / "ckpt", config.sha256()
    ids, n = load_ids(session, "train", bld.tokens // config.data.seq_len, offset=bld.calib_sequences)
    steps = max(1, n // bld.batch_size)
    start = shard.broadcast(checkpoint.latest_step(ckpt_root, cfg_hash) if shard.first else None)
    rows: dict[str, list[dict[str, Any]]] = {"losses": [], "validation": []}
    if start:
        for t in trainers.values():
            part = checkpoint.load_layer(ckpt_root, start, t.layer, t.modules, t.optimizer)
            for k in rows:
                rows[k] += part.get(k, [])
        log.info("resuming BLD at step %d of %d", start, steps)
    vids, vn = load_ids(session, "validation", bld.val_sequences)
    all_modules = {k: m for t in trainers.values() for k, m in t.modules.items()}
    for v in session.owned_variants():  # no-op modules, for the validation of the energy they drop
        if v.kind == "no_op":
            all_modules[v.key] = session.new_module(v)

    bar = tqdm(total=steps, initial=start, desc="BLD", unit="step", disable=not (progress and shard.first))
    t_start, tokens_per_step = time.perf_counter(), bld.batch_size * config.data.seq_len
    for step in range(start, steps):
        step_rows = _train_step(session, trainers, ids, step, steps)
        rows["losses"] += step_rows
        done = step + 1
        if bld.eval_every and done % bld.eval_every == 0 and done < steps:
            rows["validation"] += _val_rows(validate(session, all_modules, vids, vn), session, done)
        if bld.checkpoint_every and done % bld.checkpoint_every == 0 and done < steps:
            _checkpoint(session, trainers, rows, ckpt_root, done, cfg_hash)
        mean = sum(r["train_nmse"] for r in step_rows) / max(1, len(step_rows))  # this rank's variants
        bar.set_postfix(nmse=f"{mean:.4f}", tok_s=f"{(done - start) * tokens_per_step / (time.perf_counter() - t_start):.0f}")
        bar.update(1)
        if on_step is not None:
            on_step(done)
    bar.close()
    seconds = time.perf_counter() - t_start

    vbar = tqdm(desc="validate", total=-(-vn // bld.batch_size), unit="batch", disable=not (progress and shard.first))
    final = validate(session, all_modules, vids, vn, progress=vbar)
    vbar.close()
    rows["validation"] += _val_rows(final, session, steps)
    for t in trainers.values():
        for key, m in t.modules.items():
            write_state(m.state_dict(), directory / "trained" / _filename(key))
    gathered = shard.gather((final, rows))
    if shard.first:
        _finish(lib, config, gathered, steps=steps, tokens=steps * tokens_per_step, seconds=seconds, start=start)
        checkpoint.clear(ckpt_root)
    shard.barrier()
    close_shard(shard)
    return directory


def _open_checked(lib: Library, config: LibraryConfig) -> Session:
    """The parent session, after checking that the config and the parent still match the library."""
    if config.sha256("space", "data") != lib.config.sha256("space", "data"):
        raise CorruptArtifactError("the search space or data differ from the library's; build a new library instead")
    session = open_session(lib.manifest["parent"]["directory"], config)
    if parent_fingerprint(session.source) != lib.manifest["parent"]["fingerprint"]:
        raise CorruptArtifactError(f"the parent at {session.source.directory} is not the one {lib.directory} was "
                                   "built from (config or weight files differ); rebuild the library")
    return session


def _train_step(session: Session, trainers: dict[int, "LayerTrainer"], ids: torch.Tensor | None, step: int,
                steps: int) -> list[dict[str, Any]]:
    """One parent pass over batch ``step`` training every variant, then every optimizer step."""
    bld, seq_len = session.config.bld, session.config.data.seq_len
    lr = lr_at(step, steps, bld.lr, bld.warmup_fraction, bld.min_lr_ratio)
    batch = batches_of(ids, (step + 1) * bld.batch_size, bld.batch_size, seq_len,
                       first=session.shard.first, start=step * bld.batch_size)
    run_pass(session.teacher, batch, lambda l, x, h, y, ctx: trainers[l].train_on(session, x, h, y, ctx))
    step_rows = _step_rows(trainers, step, lr)  # raises on a NaN before any optimizer step
    for t in trainers.values():
        t.step(lr, bld.grad_clip)
    return step_rows


def _filename(key: str) -> str:
    return key.replace(":", "-") + ".safetensors"


def _load_trainers(session: Session, lib: Library) -> dict[int, LayerTrainer]:
    trainers, bld = {}, session.config.bld
    for l in session.shard.layers:
        modules, subs, scales = {}, {}, {}
        for v in session.variants(l):
            if not v.trainable:
                continue
            m = session.new_module(v)
            m.load_state_dict(read_state(lib.directory / "init" / v.filename))
            m.train().requires_grad_(True)
            modules[v.key], subs[v.key] = m, v.subblock
            scales[v.key] = bld.linear_lr_scale if v.kind == "linear" else 1.0
        trainers[l] = LayerTrainer(l, modules, subs, scales, bld.weight_decay)
    return trainers


def _step_rows(trainers: dict[int, LayerTrainer], step: int, lr: float) -> list[dict[str, Any]]:
    keys = [(t.layer, k) for t in trainers.values() for k in t.losses]
    if not keys:
        return []
    values = torch.stack([trainers[l].losses[k] for l, k in keys]).float().cpu().tolist()  # one device sync
    out = []
    for (l, k), val in zip(keys, values):
        if not math.isfinite(val):
            raise NumericalError(f"step {step + 1}: training NMSE of {k} is {val}; lower bld.lr (now {lr:g}) "
                                 "or use bld.dtype float32")
        _, sub, label = k.split(".", 2)
        out.append({"step": step + 1, "layer": l, "subblock": sub, "variant": label, "train_nmse": val, "lr": lr})
    return out


def _val_rows(val: dict[str, float], session: Session, step: int) -> list[dict[str, Any]]:
    out = []
    for v in session.owned_variants():
        if v.trainable:
            out.append({"step": step, "layer": v.layer, "subblock": v.subblock, "variant": v.label, "val_nmse": val[v.key]})
    return out


def _checkpoint(session: Session, trainers: dict[int, LayerTrainer], rows: dict[str, list[dict[str, Any]]],
                root: Path, step: int, cfg_hash: str) -> None:
    for t in trainers.values():
        mine = {k: [r for r in v if r["layer"] == t.layer] for k, v in rows.items()}
        checkpoint.save_layer(root, step, t.layer, t.modules, t.optimizer, mine)
    session.shard.barrier()
    if session.shard.first:
        checkpoint.commit(root, step, cfg_hash)
    session.shard.barrier()


def _finish(lib: Library, config: LibraryConfig, gathered: list[Any], *, steps: int, tokens: int,
            seconds: float, start: int) -> None:
    final: dict[str, float] = {}
    losses, validation = [], []
    for f, r in gathered:
        final.update(f)
        losses += r["losses"]
        validation += r["validation"]
    table = lib.table.copy()
    trained_rows = table[~table.is_parent.astype(bool) & (table.kind != "no_op")]
    validation += [{"step": 0, "layer": int(r.layer), "subblock": r.subblock, "variant": r.variant,
                    "val_nmse": float(r.init_val_nmse)} for r in trained_rows.itertuples()]  # from the build
    for i, row in table.iterrows():
        key = f"L{int(row.layer):03d}.{row.subblock}.{row.variant}"
        trainable = not bool(row.is_parent) and row.kind != "no_op"
        table.at[i, "final_val_nmse"] = final[key]
        table.at[i, "trained"] = trainable
        if trainable:
            table.at[i, "file"] = f"trained/{_filename(key)}"
    table = table[INDEX_COLUMNS]
    d = lib.directory
    sort = ["step", "layer", "subblock", "variant"]
    atomic_write_text(d / "bld" / "losses.csv", pd.DataFrame(losses).sort_values(sort).to_csv(index=False))
    atomic_write_text(d / "bld" / "validation.csv", pd.DataFrame(validation).sort_values(sort).to_csv(index=False))
    atomic_write_text(d / INDEX, table.to_csv(index=False))
    manifest = dict(lib.manifest)
    manifest.update(status="trained", config=config.to_dict(), config_sha256=config.sha256(),
                    bld={"steps": steps, "tokens": tokens, "seconds_this_run": round(seconds, 2), "resumed_at_step": start})
    atomic_write_json(d / MANIFEST, manifest)
