"""Block-wise local distillation: every variant learns to imitate its parent sub-block.

One parent forward per batch feeds every trainable variant of every layer (teacher forcing,
:mod:`block_library.teacher`). Attention variants learn ``x -> h`` and FFN variants ``h -> y``
independently, so A attention and F FFN variants cost A + F trainings and give A x F blocks.
The loss is the normalized MSE (:mod:`block_library.session`); each layer has its own AdamW and
each variant its own gradient clip, so no variant influences another and the result does not
depend on how layers are split over processes. When a rank's variants and their AdamW state do
not fit its memory limit, they are trained in rounds (:mod:`block_library.rounds`): each round
replays the same teacher passes for its own variants, so rounds change memory, not weights.
Checkpoints every ``checkpoint_every`` steps and a record of completed rounds
(:mod:`block_library.checkpoint`) make an interrupted run resume where it stopped.
"""

from __future__ import annotations

import hashlib
import json
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

from block_library import checkpoint, rounds
from block_library.artifact import INDEX, INDEX_COLUMNS, MANIFEST, Library, read_state, write_state
from block_library.config import LibraryConfig
from block_library.distributed import close_shard
from block_library.schedule import TrainingSchedule, lr_at  # noqa: F401 (lr_at: still importable from here)
from block_library.session import (Session, load_ids, nmse_sums, open_session, parent_fingerprint, validate,
                                   variant_params)
from block_library.teacher import batches_of, run_pass
from puzzle.errors import CorruptArtifactError, NumericalError
from puzzle.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


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

    def step(self, lr: float, schedule: TrainingSchedule) -> None:
        if self.optimizer is None:
            return
        for m in self.modules.values():  # one norm per variant
            schedule.clip(m.parameters())
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def train_library(directory: str | Path, *, config: LibraryConfig | None = None, progress: bool = True,
                  on_step: Callable[[int], None] | None = None, force: bool = False,
                  max_memory_bytes: float | None = None, on_round: Callable[[int], None] | None = None) -> Path:
    """Run (or resume) BLD on a built library; writes ``trained/``, the index, and the loss logs.

    ``config`` defaults to the library's own; passing one with another ``bld`` section (e.g. more
    tokens) retrains from the initialization. ``on_step(step)`` is called after every step,
    ``on_round(k)`` after round ``k`` (0-based) is recorded. ``force``: train again even if the
    library says it is trained with this config (a trained file was lost or damaged); an
    interrupted run still resumes from its last round and checkpoint. ``max_memory_bytes``: a
    rank's memory limit; its variants are trained in as many rounds (:mod:`block_library.rounds`)
    as it takes to fit (None: one round).
    """
    directory = Path(directory).expanduser().resolve()
    lib = Library(directory)
    config = config or lib.config
    if not force and lib.status == "trained" and lib.manifest.get("config_sha256") == config.sha256():
        log.info("%s is already trained with this config; nothing to do", directory)
        return directory
    session = _open_checked(lib, config)
    shard = session.shard
    run = _Run(session, lib, progress=progress, on_step=on_step)
    done = shard.broadcast(_completed_rounds(lib, run.cfg_hash) if shard.first else None)
    trained = {key for r in done for keys in r["variants"] for key in keys}
    items = [(v.key, variant_params(v, session.parent_config)) for v in session.owned_variants()
             if v.trainable and v.key not in trained]
    table = rounds.agree_rounds(session, items, max_memory_bytes, bytes_per_param=rounds.TRAIN_BYTES_PER_PARAM)
    first_round, total = len(done), len(done) + len(table[0])
    if first_round:
        log.info("resuming BLD at round %d of %d (%d variants already trained)", first_round + 1, total, len(trained))
    t_start, resumed_at_step = time.perf_counter(), 0
    for j in range(len(table[0])):
        k, keys = first_round + j, [table[r][j] for r in range(shard.world)]  # keys[rank]: that rank's variants
        final, rows, start = run.train_round(k, total, keys, with_no_ops=(j == 0))
        if j == 0:
            resumed_at_step = start
        gathered = shard.gather((final, rows))
        if shard.first:
            done.append({"variants": keys, "final": {key: v for f, _ in gathered for key, v in f.items()}})
            checkpoint.save_round(run.bld_dir, run.cfg_hash, done,
                                  {name: [x for _, r in gathered for x in r[name]] for name in rows})
            checkpoint.clear(run.ckpt_root)
        shard.barrier()
        rounds.release(shard.device)  # the round's modules and AdamW state
        if on_round is not None:
            on_round(k)
    if shard.first:
        _finish(lib, config, done, steps=run.steps, tokens=run.steps * run.tokens_per_step,
                seconds=time.perf_counter() - t_start, start=resumed_at_step, first_round=first_round)
    shard.barrier()
    close_shard(shard)
    return directory


class _Run:
    """What every round of one ``train_library`` call shares: data, step count, where checkpoints go."""

    def __init__(self, session: Session, lib: Library, *, progress: bool,
                 on_step: Callable[[int], None] | None) -> None:
        config, bld = session.config, session.config.bld
        self.session, self.lib, self.progress, self.on_step = session, lib, progress, on_step
        self.bld_dir, self.cfg_hash = lib.directory / "bld", config.sha256()
        self.ckpt_root = self.bld_dir / "ckpt"
        self.ids, n = load_ids(session, "train", bld.tokens // config.data.seq_len, offset=bld.calib_sequences)
        if bld.seed and self.ids is not None:  # (n, seq_len) rows in the seed's order; rank 0 holds the ids
            self.ids = self.ids[torch.randperm(n, generator=torch.Generator().manual_seed(bld.seed))]
        self.steps = max(1, n // bld.batch_size)
        self.vids, self.vn = load_ids(session, "validation", bld.val_sequences)
        self.tokens_per_step = bld.batch_size * config.data.seq_len
        self.params = {v.key: variant_params(v, session.parent_config)
                       for l in range(len(session.layer_variants)) for v in session.variants(l)}

    def train_round(self, k: int, total: int, keys: list[list[str]], *,
                    with_no_ops: bool) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]], int]:
        """Train round ``k`` (``keys[rank]``: each rank's variants) over every step, validate it, write
        its trained files; return this rank's final validation NMSE, its log rows, the step it resumed at."""
        session, bld = self.session, self.session.config.bld
        shard, steps = session.shard, self.steps
        trainers = _load_trainers(session, self.lib, set(keys[shard.rank]))
        modules = {key: m for t in trainers.values() for key, m in t.modules.items()}
        if with_no_ops:  # no-op modules, for the validation of the energy they drop
            modules.update({v.key: session.new_module(v) for v in session.owned_variants() if v.kind == "no_op"})
        tag = hashlib.sha256(json.dumps([self.cfg_hash, keys]).encode()).hexdigest()  # config + partition
        start = shard.broadcast(checkpoint.latest_step(self.ckpt_root, tag, round_index=k) if shard.first else None)
        rows: dict[str, list[dict[str, Any]]] = {"losses": [], "validation": []}
        if start:
            for t in trainers.values():
                part = checkpoint.load_layer(self.ckpt_root, start, t.layer, t.modules, t.optimizer, round_index=k)
                for name in rows:
                    rows[name] += part.get(name, [])
            log.info("resuming BLD at step %d of %d (round %d/%d)", start, steps, k + 1, total)
        if shard.first:
            info = rounds.summary([[r] for r in keys], self.params, bytes_per_param=rounds.TRAIN_BYTES_PER_PARAM)[0]
            log.info("BLD round %d/%d: %d variants, %s on the fullest rank", k + 1, total, info["variants"],
                     rounds.format_bytes(info["bytes"]))
        if any(keys):  # else: nothing to train anywhere (all done before a restart), only validate
            self._steps(trainers, modules, rows, start=start, tag=tag, desc=f"BLD {k + 1}/{total}", k=k)
        vbar = tqdm(desc="validate", total=-(-self.vn // bld.batch_size), unit="batch",
                    disable=not (self.progress and shard.first))
        final = validate(session, modules, self.vids, self.vn, progress=vbar)
        vbar.close()
        rows["validation"] += _val_rows(final, session, steps)
        for t in trainers.values():
            for key, m in t.modules.items():
                write_state(m.state_dict(), self.lib.directory / "trained" / _filename(key))
        return final, rows, start

    def _steps(self, trainers: dict[int, LayerTrainer], modules: dict[str, nn.Module],
               rows: dict[str, list[dict[str, Any]]], *, start: int, tag: str, desc: str, k: int) -> None:
        """The step loop of one round: the same batches and LR schedule in every round."""
        session, bld, steps = self.session, self.session.config.bld, self.steps
        shard = session.shard
        bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not (self.progress and shard.first))
        t_start = time.perf_counter()
        for step in range(start, steps):
            step_rows = _train_step(session, trainers, self.ids, step, steps)
            rows["losses"] += step_rows
            done = step + 1
            if bld.eval_every and done % bld.eval_every == 0 and done < steps:
                rows["validation"] += _val_rows(validate(session, modules, self.vids, self.vn), session, done)
            if bld.checkpoint_every and done % bld.checkpoint_every == 0 and done < steps:
                _checkpoint(session, trainers, rows, self.ckpt_root, done, tag, k)
            mean = sum(r["train_nmse"] for r in step_rows) / max(1, len(step_rows))  # this rank's variants
            tok_s = (done - start) * self.tokens_per_step / (time.perf_counter() - t_start)
            bar.set_postfix(nmse=f"{mean:.4f}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
            if self.on_step is not None:
                self.on_step(done)
        bar.close()


def _completed_rounds(lib: Library, cfg_hash: str) -> list[dict[str, Any]]:
    """The recorded rounds, less the variants whose trained file is gone (they are trained again)."""
    out = checkpoint.completed_rounds(lib.directory / "bld", cfg_hash)
    for r in out:
        r["variants"] = [[key for key in keys if (lib.directory / "trained" / _filename(key)).is_file()]
                         for keys in r["variants"]]
    return out


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
    lr = bld.lr_at(step, steps)
    batch = batches_of(ids, (step + 1) * bld.batch_size, bld.batch_size, seq_len,
                       first=session.shard.first, start=step * bld.batch_size)

    def visit(l: int, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, ctx: dict[str, Any]) -> None:
        if l in trainers:  # a layer with no variant in this round only passes the hidden state on
            trainers[l].train_on(session, x, h, y, ctx)

    run_pass(session.teacher, batch, visit)
    step_rows = _step_rows(trainers, step, lr)  # raises on a NaN before any optimizer step
    for t in trainers.values():
        t.step(lr, bld)
    return step_rows


def _filename(key: str) -> str:
    return key.replace(":", "-") + ".safetensors"


def _load_trainers(session: Session, lib: Library, keys: set[str]) -> dict[int, LayerTrainer]:
    """Trainers of this rank's layers that have variants in ``keys``, loaded from ``init/``."""
    trainers, bld = {}, session.config.bld
    for l in session.shard.layers:
        modules, subs, scales = {}, {}, {}
        for v in session.variants(l):
            if not v.trainable or v.key not in keys:
                continue
            m = session.new_module(v)
            m.load_state_dict(read_state(lib.directory / "init" / v.filename))
            m.train().requires_grad_(True)
            modules[v.key], subs[v.key] = m, v.subblock
            scales[v.key] = bld.linear_lr_scale if v.kind == "linear" else 1.0
        if modules:
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
    """Rows of the trainable variants that ``val`` scores (this round's)."""
    out = []
    for v in session.owned_variants():
        if v.trainable and v.key in val:
            out.append({"step": step, "layer": v.layer, "subblock": v.subblock, "variant": v.label, "val_nmse": val[v.key]})
    return out


def _checkpoint(session: Session, trainers: dict[int, LayerTrainer], rows: dict[str, list[dict[str, Any]]],
                root: Path, step: int, tag: str, round_index: int) -> None:
    for t in trainers.values():
        mine = {k: [r for r in v if r["layer"] == t.layer] for k, v in rows.items()}
        checkpoint.save_layer(root, step, t.layer, t.modules, t.optimizer, mine, round_index=round_index)
    session.shard.barrier()
    if session.shard.first:
        checkpoint.commit(root, step, tag, round_index=round_index)
    session.shard.barrier()


def _finish(lib: Library, config: LibraryConfig, done: list[dict[str, Any]], *, steps: int, tokens: int,
            seconds: float, start: int, first_round: int) -> None:
    """Merge the recorded rounds into the index, ``bld/losses.csv`` and ``bld/validation.csv``; mark trained."""
    d = lib.directory
    final: dict[str, float] = {}
    frames: dict[str, list[pd.DataFrame]] = {"losses": [], "validation": []}
    for i, r in enumerate(done):
        final.update(r["final"])  # a variant trained again after its file was lost: the later round wins
        keys = {key for part in r["variants"] for key in part}
        for name in frames:
            df = checkpoint.round_rows(d / "bld", i, name)
            df = df[("L" + df.layer.map("{:03d}".format) + "." + df.subblock + "." + df.variant).isin(keys)]
            if len(df):
                frames[name].append(df)
    table = lib.table.copy()
    trained_rows = table[~table.is_parent.astype(bool) & (table.kind != "no_op")]
    frames["validation"].append(pd.DataFrame(  # step 0: the initialization, from the build
        [{"step": 0, "layer": int(r.layer), "subblock": r.subblock, "variant": r.variant,
          "val_nmse": float(r.init_val_nmse)} for r in trained_rows.itertuples()],
        columns=checkpoint.ROW_COLUMNS["validation"]))
    for i, row in table.iterrows():
        key = f"L{int(row.layer):03d}.{row.subblock}.{row.variant}"
        trainable = not bool(row.is_parent) and row.kind != "no_op"
        table.at[i, "final_val_nmse"] = final[key]
        table.at[i, "trained"] = trainable
        if trainable:
            table.at[i, "file"] = f"trained/{_filename(key)}"
    table = table[INDEX_COLUMNS]
    sort = ["step", "layer", "subblock", "variant"]
    for name, parts in frames.items():
        df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=checkpoint.ROW_COLUMNS[name])
        atomic_write_text(d / "bld" / f"{name}.csv", df.sort_values(sort).to_csv(index=False))
    atomic_write_text(d / INDEX, table.to_csv(index=False))
    checkpoint.clear_rounds(d / "bld")  # before the manifest: a later forced run must not skip rounds
    checkpoint.clear(d / "bld" / "ckpt")
    manifest = dict(lib.manifest)
    manifest.update(status="trained", config=config.to_dict(), config_sha256=config.sha256(),
                    bld={"steps": steps, "tokens": tokens, "seconds_this_run": round(seconds, 2),
                         "resumed_at_step": start, "resumed_at_round": first_round,
                         "rounds": {"count": len(done), "sizes": [[len(p) for p in r["variants"]] for r in done]}})
    atomic_write_json(d / MANIFEST, manifest)
