"""GKD over the processes ``torchrun`` starts: FSDP2 shards both models, every rank trains on its share of a batch.

    torchrun --nproc-per-node 8 -m puzzle.cli.main distill runs/child --parent smollm2-135m --out runs/gkd

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`join` joins the process group (``block_library.distributed``:
NCCL on GPU, gloo on CPU) and :func:`shard_model` gives each rank 1/world of a model, by
``torch.distributed.fsdp.fully_shard`` on every decoder layer (and on the embedding and the LM head
when they are not tied), then on the root. A sharded module all-gathers one unit's weights for its
forward (and again for its backward) and frees them after, so a rank holds its shard of the student
(fp32 weights, gradients, AdamW moments) and of the parent (forward only, never a gradient) plus the
unit running now. The models are built on the meta device and filled shard by shard from the models
passed in: no rank makes a full copy of either.

Data parallel: rank r trains on rows ``[r * b, (r + 1) * b)`` of each batch (``b = batch / world``);
its loss is the mean over its rows and FSDP averages the gradients over the ranks (reduce-scatter),
so the global gradient is the single-process one, up to float rounding. Metrics are all-reduced, so
every rank reports the same numbers. The tensors of a checkpoint are gathered whole (``full_tensor``,
one at a time) and written by rank 0, so a checkpoint is the single-process one: a run can resume on
another number of processes.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from block_library.distributed import Shard, init_shard
from puzzle.model import PuzzleForCausalLM

log = logging.getLogger(__name__)
T = TypeVar("T")


def join() -> tuple[Shard, DeviceMesh] | None:
    """This rank's place and a 1-D device mesh over all ranks under ``torchrun`` (WORLD_SIZE > 1); else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    # FSDP splits every layer over all ranks: the contiguous layer ranges init_shard also hands out are unused.
    shard = init_shard([1.0] * world)
    return shard, init_device_mesh(shard.device.type, (world,))


def checkpoint_layers(model: PuzzleForCausalLM) -> Callable[[], None]:
    """Activation checkpointing: each decoder layer keeps only its input for the backward and recomputes the
    rest then. Returns the function that undoes it. The weights and their names are untouched (no wrapper)."""
    layers = list(model.model.layers)
    for layer in layers:
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)  # the bound class forward, wrapped

    def undo() -> None:
        for layer in layers:
            del layer.forward

    return undo


def _units(model: PuzzleForCausalLM) -> Iterator[torch.nn.Module]:
    """The modules sharded on their own before the root: every layer; the embedding and LM head unless tied."""
    yield from model.model.layers
    if not model.config.tie_word_embeddings:
        yield model.model.embed_tokens
        yield model.lm_head


def shard_model(model: PuzzleForCausalLM, mesh: DeviceMesh, *, dtype: torch.dtype, trainable: bool,
                activation_checkpointing: bool = False, offload: bool = False,
                stored: dict[str, Callable[[], torch.Tensor]] | None = None,
                trained: list[str] | None = None) -> PuzzleForCausalLM:
    """A copy of ``model`` in ``dtype``, sharded over ``mesh`` (FSDP2) and filled from ``model``, which is not changed.

    ``trainable`` False: a forward-only teacher (no gradients). ``trained``: with ``trainable``, the names of the
    parameters that train (:func:`puzzle.distill.trainable.trained_names`; default all); the others are marked
    ``requires_grad`` False before sharding, and FSDP2 keeps them in the same units, gathering them for the forward
    and the backward but never reducing a gradient of theirs. Each rank allocates only its shards.
    ``stored``: read each tensor from disk instead (``puzzle.loading.stored_tensors``; ``model`` may
    then be on the meta device), one at a time: no rank ever holds the whole model. ``offload``: the
    shards (and their gradients and optimizer state) live in host RAM (``CPUOffloadPolicy``; CUDA only).
    """
    with torch.device("meta"):
        sharded = type(model)(copy.deepcopy(model.config))
    if model.config.tie_word_embeddings:
        sharded.lm_head.weight = sharded.model.embed_tokens.weight
    sharded.to(dtype).requires_grad_(trainable).train(trainable)
    if trainable and trained is not None:
        from puzzle.distill.trainable import freeze

        freeze(sharded, trained)
    if activation_checkpointing:
        checkpoint_layers(sharded)
    policy = {"offload_policy": CPUOffloadPolicy()} if offload and mesh.device_type == "cuda" else {}
    for unit in _units(sharded):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, **policy)
    fully_shard(sharded, mesh=mesh, reshard_after_forward=True, **policy)
    sharded.to_empty(device="cpu" if policy else mesh.device_type)
    source = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in sharded.named_parameters():
            full = stored[name]() if stored is not None else source[name].detach()
            p.copy_(place(full, p))
            del full
    return sharded


def place(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` as ``like`` holds it: this rank's shard (no communication) of a sharded tensor, else the whole."""
    full = full.to(device=like.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


def gather(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` on the CPU: sharded tensors are all-gathered (a collective: every rank calls it)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole on the CPU, by name (tied weights once)."""
    return {name: gather(p) for name, p in model.named_parameters()}


def all_sum(values: dict[str, float], shard: Shard | None) -> dict[str, float]:
    """``values`` summed over the ranks (float64), the same on every rank."""
    if shard is None:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=shard.device)  # NCCL: a CUDA tensor
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def on_rank0(fn: Callable[[], T], shard: Shard | None) -> T:
    """``fn()`` run by rank 0 alone, its result (or its exception, raised everywhere) handed to every rank."""
    if shard is None:
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if shard.first:
        try:
            outcome = (True, fn())
        except Exception as e:  # every rank raises it, so none waits forever on the others
            outcome = (False, e)
    ok, value = shard.broadcast(outcome)
    if not ok:
        raise value
    return value


def is_writer(shard: Shard | None) -> bool:
    """Whether this process writes the run's files: the only process, or rank 0."""
    return shard is None or shard.first


def barrier(shard: Shard | None) -> None:
    if shard is not None:
        shard.barrier()
