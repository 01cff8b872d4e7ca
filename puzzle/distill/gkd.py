"""Global knowledge distillation (GKD): train a whole assembled child to imitate its frozen parent.

    from puzzle.distill import GKDConfig, distill_child
    result = distill_child(child, parent, tokenizer, "runs/gkd", GKDConfig(steps=32))
    result.initial["kl"], result.final["kl"]     # validation KL(parent || child) before and after
    result.model                                 # the distilled child (also saved in runs/gkd/child)

BLD trains each block alone on the parent's activations; after the blocks are assembled their
errors compound, and GKD (the Puzzle paper's final stage) repairs that end to end: every child
weight is trained on the KL of next-token distributions plus the cosine distance of hidden states
(:mod:`puzzle.distill.losses`). The child passed in is copied, never modified; the parent runs
without gradients and is never modified either. Checkpoints every ``checkpoint_every`` steps
(:mod:`puzzle.distill.artifact`) make an interrupted run resume where it stopped, bit for bit.

Under ``torchrun`` with more than one process, both models are sharded with FSDP2 and every process
trains on its share of each batch (:mod:`puzzle.distill.sharding`; memory per process:
:func:`puzzle.distill.memory.gkd_rank_bytes`): same losses and weights as one process, up to float
rounding. Every process returns the same result; rank 0 writes the files. With cached teacher targets
(``teacher=``, the same on every process: :func:`puzzle.distill.teacher_sharded.sharded_targets` computes them
layer-sharded) each process reads its rows' targets and no training step runs the parent; the sharded parent
then serves validation alone (forward only), unless the validation sequences' targets are cached too
(``val_teacher=``): then no process loads the parent at all.

``cfg.train`` (:mod:`puzzle.distill.trainable`) freezes part of the child (``requires_grad`` False before it is
sharded; the optimizer gets the trained parameters alone): the embedding and LM head (``decoder``), or everything
but the sub-blocks that differ from the parent's (``replaced``). Frozen weights come back bit for bit as given.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.distributed.device_mesh import DeviceMesh
from tqdm.auto import tqdm

from block_library.distributed import Shard
from puzzle.data.packing import load_sequences
from puzzle.distill import artifact, sharding
from puzzle.distill.config import GKDConfig
from puzzle.distill.losses import (LayerMap, batch_losses, cached_batch_losses, cached_validation_sums,
                                   check_compatible, resolve_layer_map, validation_metrics, validation_sums)
from puzzle.distill.teacher_cache import TeacherTargets, targets_key
from puzzle.distill.trainable import freeze, trained_names
from puzzle.errors import ConfigError, NumericalError
from puzzle.model import PuzzleForCausalLM
from puzzle.model.weights import model_from_state_dict

log = logging.getLogger(__name__)


@dataclass
class GKDResult:
    """A finished GKD run."""

    model: PuzzleForCausalLM
    """The distilled child (fp32, eval mode), in memory; also saved under ``directory / "child"``."""
    curve: pd.DataFrame
    """One row per step (``artifact.CURVE_COLUMNS``); step 0 is the child as given."""
    initial: dict[str, float]
    """Validation metrics before training: ``kl`` (KL(parent || child), nats/token), ``top1`` (agreement),
    ``lm`` (the child's cross-entropy; the parent's is ``manifest["parent_val_lm"]``), ``cos`` (distance)."""
    final: dict[str, float]
    """The same metrics after training."""
    directory: Path
    """The run's directory."""
    reused: bool = False
    """True when the run was already complete and nothing was trained now."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The run's ``manifest.json``: inputs and their fingerprints, config, metrics, tokens, seconds."""


def distill_child(child: PuzzleForCausalLM, parent: PuzzleForCausalLM, tokenizer: Any, out_dir: str | Path,
                  cfg: GKDConfig | None = None, *, layer_map: Sequence[Sequence[int]] | None = None,
                  force: bool = False, progress: bool = True, teacher: TeacherTargets | None = None,
                  val_teacher: TeacherTargets | None = None, on_step: Callable[[int], None] | None = None
                  ) -> GKDResult:
    """Distill ``child`` against ``parent`` (or resume, or reuse a complete run in ``out_dir``).

    ``layer_map``: (child hidden index, parent hidden index) pairs for ``hidden="all"`` when the depths
    differ. ``on_step(step)`` is called after every optimizer step. Raises :class:`StaleArtifactError`
    when ``out_dir`` holds a run of other inputs (unless ``force``) and :class:`NumericalError` on a
    non-finite loss.

    ``teacher``: the parent's cached targets on :func:`gkd_train_ids` (``hidden="final"``): training steps then run
    no parent forward pass; validation still does. Their key must be of this run's parent fingerprint: in one process
    :func:`puzzle.distill.teacher_cache.teacher_targets` (``artifact.model_fingerprint``); under torchrun with stored
    models :func:`puzzle.distill.teacher_sharded.sharded_targets` with ``parent_sha256 =
    artifact.files_fingerprint(parent)``, the same targets on every process (each takes its rows of every batch).
    ``val_teacher``: the same for :func:`gkd_val_ids`, with ``labels`` (the parent's log-probability of each next
    token): validation measures the child against them (the KL coarsened to their top k, exact when k = V), and
    with ``teacher`` too no process loads the parent (it is read for its fingerprint and config alone).

    Under ``torchrun`` (WORLD_SIZE > 1) every process calls this with the same arguments (the models may
    stay on the CPU: the shards go to the process's GPU, or stay on the CPU without CUDA); ``out_dir`` must
    be a directory every process sees. ``cfg.batch`` must be a multiple of the number of processes.
    """
    cfg = cfg or GKDConfig()
    out = Path(out_dir).expanduser().resolve()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_disk = on_meta(child) or on_meta(parent)
    if on_disk and not (on_meta(child) and on_meta(parent) and world > 1):
        raise ConfigError("stored (meta-device) child and parent are for GKD under torchrun; in one process pass "
                          "loaded models (puzzle.loading.load_model)")
    check_compatible(child, parent)
    pairs = resolve_layer_map(cfg, child.config.num_hidden_layers, parent.config.num_hidden_layers, layer_map)
    if cfg.batch % world:
        raise ConfigError(f"batch {cfg.batch} does not split over {world} processes: use a multiple of {world}")
    if (teacher is not None or val_teacher is not None) and cfg.hidden != "final":
        raise ConfigError("cached teacher targets hold the last hidden state only (hidden='final'); "
                          "drop them (a live parent) or use hidden='final'")
    trained = trained_names(child, parent.config, cfg.train)
    if not trained:
        raise ConfigError(f"GKD with train={cfg.train!r} has nothing to train: the child has no sub-block that "
                          "differs from the parent's")
    train_ids, val_ids = gkd_train_ids(cfg, tokenizer), gkd_val_ids(cfg, tokenizer)
    fingerprint = artifact.files_fingerprint if on_disk else artifact.model_fingerprint
    inputs = {"config": cfg.identity(), "child_sha256": fingerprint(child),
              "parent_sha256": fingerprint(parent), "layer_map": [list(p) for p in pairs],
              "train_ids_sha256": artifact.ids_sha256(train_ids), "val_ids_sha256": artifact.ids_sha256(val_ids)}
    if teacher is not None:
        if teacher.key != targets_key(inputs["parent_sha256"], train_ids, teacher.top_k):
            how = ("sharded_targets(parent_dir, gkd_train_ids(cfg, tokenizer), top_k, path, shard=..., "
                   "parent_sha256=files_fingerprint(parent))" if on_disk else
                   "teacher_targets(parent, gkd_train_ids(cfg, tokenizer), top_k, path)")
            raise ConfigError(f"the cached teacher targets are of other tokens or another parent: compute them "
                              f"with {how}")
        inputs["teacher_top_k"] = teacher.top_k  # the coarsened KL trains other weights than the full one
    if val_teacher is not None:
        if val_teacher.key != targets_key(inputs["parent_sha256"], val_ids, val_teacher.top_k) or \
                val_teacher.label is None:
            raise ConfigError("the cached validation targets are of other tokens or another parent, or lack the "
                              "parent's next-token log-probs: compute them with sharded_targets(parent_dir, "
                              "gkd_val_ids(cfg, tokenizer), top_k, path, shard=..., parent_sha256=..., labels=True)")
        inputs["val_teacher_top_k"] = val_teacher.top_k  # the validation KL is the coarsened one
    joined = sharding.join()
    shard, mesh = joined if joined is not None else (None, None)
    done = sharding.on_rank0(lambda: artifact.prepare(out, inputs, force=force), shard)
    if done is not None:
        log.info("%s already holds this GKD run (complete); nothing to do", out)
        return _stored_result(out, done, load=not on_disk)

    live = teacher is None or val_teacher is None  # the parent runs in some step or validation
    student, teacher_model, plain = _models(child, parent if live else None, cfg, mesh, trained)
    if teacher is not None:
        log.info("GKD on the parent's cached top-%d targets: the parent runs %s", teacher.top_k,
                 "in validation only" if live else "nowhere (validation reads its cached targets too)")
    params = [p for p in student.parameters() if p.requires_grad]
    counts = (sum(p.numel() for p in params), sum(p.numel() for p in student.parameters()))
    log.info("GKD trains %d of the child's %d parameters (train=%s)", *counts, cfg.train)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    key = artifact.inputs_sha256(inputs)
    start, rows = artifact.load_checkpoint(out, model=student, optimizer=optimizer, inputs_key=key)
    if start:
        log.info("resuming GKD at step %d of %d", start, cfg.steps)
    else:
        rows = [_val_row(student, teacher_model, val_ids, pairs, cfg, step=0, shard=shard, cached=val_teacher)]
    t0 = time.perf_counter()
    rows = _train(student, teacher_model, optimizer, cfg, pairs, train_ids=train_ids, val_ids=val_ids, rows=rows,
                  start=start, out=out, key=key, shard=shard, progress=progress, on_step=on_step,
                  cached=(teacher, val_teacher))
    seconds = time.perf_counter() - t0

    model = plain(student)
    curve = artifact.curve_frame(rows)
    initial, final = _metrics_at(curve, 0), _metrics_at(curve, cfg.steps)
    manifest = {
        "stage": artifact.STAGE, "status": "complete", "inputs": inputs, "config": cfg.to_dict(),
        "initial": initial, "final": final, "parent_val_lm": rows[0]["val_parent_lm"], "child": artifact.CHILD,
        "tokens": {"train": cfg.steps * cfg.batch * cfg.seq_len, "validation": int(val_ids.numel())},
        "train_tokens_per_s": round((cfg.steps - start) * cfg.batch * cfg.seq_len / max(seconds, 1e-9), 1),
        "seconds_this_run": round(seconds, 2), "resumed_at_step": start, "processes": world,
        "params": {"trained": counts[0], "frozen": counts[1] - counts[0]}}
    if on_disk:  # every rank gathers tensor by tensor; rank 0 writes each one and drops it
        artifact.save_child_sharded(out, model, tokenizer, shard)
        model = None
    if sharding.is_writer(shard):
        artifact.write_curve(out, rows)
        if not on_disk:
            artifact.save_child(out, model, tokenizer)
        artifact.finish(out, manifest)
    sharding.barrier(shard)  # the child is on disk before any process returns
    log.info("GKD: validation KL %.4f -> %.4f, top-1 %.3f -> %.3f; child saved to %s",
             initial["kl"], final["kl"], initial["top1"], final["top1"], out / artifact.CHILD)
    return GKDResult(model=model, curve=curve, initial=initial, final=final, directory=out, manifest=manifest)


def gkd_train_ids(cfg: GKDConfig, tokenizer: Any) -> torch.Tensor:
    """(steps x batch, seq_len) ids: the train split's sequences GKD reads (a step visits them in the seed's order)."""
    return load_sequences(cfg.sources, tokenizer, seq_len=cfg.seq_len, num_sequences=cfg.train_sequences, split="train")


def gkd_val_ids(cfg: GKDConfig, tokenizer: Any) -> torch.Tensor:
    """(val_sequences, seq_len) ids: the validation split's sequences GKD measures the child on."""
    return load_sequences(cfg.sources, tokenizer, seq_len=cfg.seq_len, num_sequences=cfg.val_sequences,
                          split="validation")


def _models(child: PuzzleForCausalLM, parent: PuzzleForCausalLM | None, cfg: GKDConfig, mesh: DeviceMesh | None,
            trained: list[str]) -> tuple[PuzzleForCausalLM, PuzzleForCausalLM | None,
                                         Callable[[PuzzleForCausalLM], PuzzleForCausalLM]]:
    """The student (fp32 master weights, only the ``trained`` parameters requiring gradients), the teacher (None when
    ``parent`` is: every target is cached), and what turns the trained student into the plain result."""
    if mesh is None:
        student = copy.deepcopy(child).float().train()  # `child` untouched
        freeze(student, trained)
        undo = sharding.checkpoint_layers(student) if cfg.activation_checkpointing else (lambda: None)

        def plain(trained: PuzzleForCausalLM) -> PuzzleForCausalLM:
            undo()
            return trained.eval().requires_grad_(False)

        return student, parent, plain
    log.info("GKD over %d processes: %s sharded (FSDP2)", mesh.size(), "both models" if parent else "the student")
    from puzzle.loading import stored_tensors

    on_disk = on_meta(child)  # stored models: each rank reads only its shards from the files
    student = sharding.shard_model(child, mesh, dtype=torch.float32, trainable=True,
                                   activation_checkpointing=cfg.activation_checkpointing, offload=cfg.offload,
                                   stored=stored_tensors(child.name_or_path) if on_disk else None, trained=trained)
    teacher = None if parent is None else sharding.shard_model(
        parent, mesh, dtype=next(parent.parameters()).dtype, trainable=False,
        stored=stored_tensors(parent.name_or_path) if on_disk else None)
    if on_disk:
        return student, teacher, lambda trained: trained  # written tensor by tensor: see artifact.save_child_sharded

    def gathered(trained: PuzzleForCausalLM) -> PuzzleForCausalLM:  # every process: a whole CPU copy
        state = sharding.full_state(trained)
        return model_from_state_dict(copy.deepcopy(child.config), state, dtype=torch.float32).requires_grad_(False)

    return student, teacher, gathered


def _train(student: PuzzleForCausalLM, parent: PuzzleForCausalLM | None, optimizer: torch.optim.Optimizer,
           cfg: GKDConfig, pairs: LayerMap, *, train_ids: torch.Tensor, val_ids: torch.Tensor,
           rows: list[dict[str, Any]], start: int, out: Path, key: str, shard: Shard | None, progress: bool,
           on_step: Callable[[int], None] | None,
           cached: tuple[TeacherTargets | None, TeacherTargets | None] = (None, None)) -> list[dict[str, Any]]:
    """Steps ``start`` .. ``cfg.steps``: one curve row each, validations and checkpoints on schedule. ``cached``: the
    parent's targets of the training and of the validation sequences, or None where the parent runs live."""
    train_targets, val_targets = cached
    device = next(student.parameters()).device
    writer = sharding.is_writer(shard)
    rank, world = (shard.rank, shard.world) if shard is not None else (0, 1)
    local = cfg.batch // world  # this process's rows of each batch
    # The visiting order is a function of the seed alone, so the data position of step s is s * batch.
    n = train_ids.shape[0]
    order = visit_order(cfg, n)
    bar = tqdm(total=cfg.steps, initial=start, desc="GKD", unit="step", disable=not (progress and writer))
    for step in range(start, cfg.steps):
        done = step + 1
        lr = cfg.lr_at(step, cfg.steps)
        rows_of_step = [(step * cfg.batch + j) % n for j in range(rank * local, (rank + 1) * local)]
        idx = order[rows_of_step]
        batch = train_ids[idx].to(device)  # (local, T)
        targets = train_targets.rows(idx) if train_targets is not None else None
        row = {"step": done, "lr": lr,
               **_train_step(student, parent, batch, optimizer, lr, cfg, pairs, step, shard=shard, cached=targets)}
        if done == cfg.steps or (cfg.val_every and done % cfg.val_every == 0):
            row.update(_val_row(student, parent, val_ids, pairs, cfg, step=done, shard=shard, cached=val_targets))
        rows.append(row)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            tensors = artifact.training_state(student, optimizer, keep=writer)  # every process: a collective
            if writer:
                artifact.save_checkpoint(out, step=done, tensors=tensors, rows=rows, inputs_key=key,
                                         data_position=done * cfg.batch)
                artifact.write_curve(out, rows)
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", kl=f"{row['train_kl']:.4f}", cos=f"{row['train_cos']:.4f}")
        bar.update(1)
        if on_step is not None:
            on_step(done)
    bar.close()
    return rows


def _train_step(student: PuzzleForCausalLM, parent: PuzzleForCausalLM, batch: torch.Tensor,
                optimizer: torch.optim.Optimizer, lr: float, cfg: GKDConfig, pairs: LayerMap,
                step: int, *, shard: Shard | None, cached: TeacherTargets | None = None) -> dict[str, float]:
    """One optimizer step on this process's ``batch`` (b, T), gradients accumulated over micro-batches (and
    averaged over the processes by FSDP's reduce-scatter, as the losses are here)."""
    chunk = cfg.micro_batch or batch.shape[0]
    totals = {"loss": 0.0, "kl": 0.0, "cos": 0.0, "lm": 0.0}
    for c in range(0, batch.shape[0], chunk):
        part = batch[c:c + chunk]
        share = part.shape[0] / batch.shape[0]  # every sequence has T-1 scored tokens: mean of means
        if cached is None:
            losses = batch_losses(student, parent, part, cfg, pairs)
        else:  # the parent's targets of these rows, read from the cache
            losses = cached_batch_losses(student, part, cached.rows(torch.arange(c, c + part.shape[0])), cfg)
        (losses["loss"] * share).backward()
        for k in totals:
            totals[k] += share * float(losses[k].detach())
    if shard is not None:  # the mean over processes: every one sees the same loss (and raises together below)
        totals = {k: v / shard.world for k, v in sharding.all_sum(totals, shard).items()}
    if not math.isfinite(totals["loss"]):
        optimizer.zero_grad(set_to_none=True)
        raise NumericalError(f"GKD step {step + 1}: the loss is {totals['loss']} (kl {totals['kl']}, "
                             f"cos {totals['cos']}, lm {totals['lm']}); lower the learning rate (now {lr:g}, peak "
                             f"{cfg.lr:g}) or check the child's weights for NaN/inf")
    cfg.clip(student.parameters())
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {f"train_{k}": v for k, v in totals.items()}


def visit_order(cfg: GKDConfig, n: int) -> torch.Tensor:
    """(n,) the order the steps visit the ``n`` training sequences in: a function of the seed alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))


def train_rows(cfg: GKDConfig, n: int, rank: int, world: int) -> torch.Tensor:
    """The training sequences process ``rank`` of ``world`` visits over all the steps (its ``batch / world`` rows of
    each step's batch): the rows of the teacher's cache it reads (:func:`puzzle.distill.teacher_cache.load_targets`),
    about 1/world of them."""
    local = cfg.batch // world
    at = [(step * cfg.batch + j) % n for step in range(cfg.steps) for j in range(rank * local, (rank + 1) * local)]
    return torch.unique(visit_order(cfg, n)[at])


def val_rows(n: int, rank: int, world: int) -> torch.Tensor:
    """The validation sequences process ``rank`` of ``world`` measures (a split of the ``n``; the first the longest)."""
    return torch.tensor_split(torch.arange(n), world)[rank]


def _val_row(student: PuzzleForCausalLM, parent: PuzzleForCausalLM | None, val_ids: torch.Tensor, pairs: LayerMap,
             cfg: GKDConfig, *, step: int, shard: Shard | None, cached: TeacherTargets | None = None
             ) -> dict[str, float]:
    """The ``val_*`` columns of a curve row; non-finite metrics raise :class:`NumericalError`. Processes split the
    sequences and sum their token sums; each runs as many forward passes as the one with the most sequences.
    ``cached``: the parent's targets on ``val_ids``, measured against instead of ``parent``."""
    world = shard.world if shard is not None else 1
    chunk = cfg.micro_batch or cfg.batch // world
    rows = torch.tensor_split(torch.arange(val_ids.shape[0]), world)  # the first is the longest
    mine = val_rows(val_ids.shape[0], shard.rank if shard is not None else 0, world)
    passes = -(-rows[0].shape[0] // chunk)
    if cached is not None:
        sums = cached_validation_sums(student, cached.rows(mine), val_ids[mine], chunk=chunk, passes=passes)
    else:
        sums = validation_sums(student, parent, val_ids[mine], pairs, chunk=chunk, passes=passes)
    sums = sharding.all_sum(sums, shard)
    metrics = validation_metrics(sums)
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        hint = ("before any training: the child as given produces non-finite outputs; check its weights"
                if step == 0 else f"lower the learning rate (peak {cfg.lr:g})")
        raise NumericalError(f"GKD validation at step {step}: {bad} not finite; {hint}")
    return {"step": step, **{f"val_{k}": v for k, v in metrics.items()}}


def _metrics_at(curve: pd.DataFrame, step: int) -> dict[str, float]:
    row = curve[curve.step == step].iloc[0]
    return {k: float(row[f"val_{k}"]) for k in ("kl", "top1", "lm", "cos")}


def on_meta(model: PuzzleForCausalLM) -> bool:
    """A stored model (``puzzle.loading.load_layers(dir, [])``): its weights still on disk."""
    return all(p.is_meta for p in model.parameters())


def _stored_result(out: Path, manifest: dict[str, Any], *, load: bool = True) -> GKDResult:
    from puzzle.loading import load_model

    model = load_model(out / artifact.CHILD).requires_grad_(False) if load else None
    return GKDResult(model=model, curve=artifact.read_curve(out), initial=dict(manifest["initial"]),
                     final=dict(manifest["final"]), directory=out, reused=True, manifest=manifest)
