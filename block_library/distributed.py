"""Sharding BLD over processes with ``torch.distributed``: each rank owns a contiguous run of layers.

    torchrun --nproc-per-node 8 -m puzzle.cli.main library train runs/lib

Rank 0 embeds the tokens and runs its layers; every rank runs the parent layers it owns (training
their variants on the way) and sends the hidden state to the next rank. Nothing else is
exchanged during a pass, so the result does not depend on the number of processes. NCCL on GPU,
gloo on CPU. Ranks write their own layers' files into the shared library directory.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's place in its group: rank, world size, the layers it owns and its device.

    A search's group (:class:`puzzle.search.ranks.Group`, this class) needs only ``rank`` and ``world``: it owns no
    layers and talks through ``barrier``, ``broadcast`` and ``gather``. A world of one never touches
    ``torch.distributed``.
    """

    rank: int
    world: int
    layers: range = range(0)
    device: torch.device = torch.device("cpu")

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1

    def recv(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        x = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        dist.recv(x, src=self.rank - 1)
        return x

    def send(self, x: torch.Tensor) -> None:
        dist.send(x.contiguous(), dst=self.rank + 1)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (a one-item list when alone); None elsewhere."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.first else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any, *, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (rank 0's by default; ``src=shard.world - 1``: the last rank's)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def split_layers(costs: Sequence[float], world: int) -> list[range]:
    """Contiguous layer ranges, one per rank, balancing the summed cost (every rank gets >= 1 layer)."""
    n = len(costs)
    if world > n:
        raise ValueError(f"{world} processes but only {n} layers; use at most {n} processes")
    total = float(sum(costs)) or 1.0
    bounds, acc, start = [], 0.0, 0
    for r in range(world - 1):
        target = total * (r + 1) / world
        end = start + 1
        acc += costs[start]
        while end < n - (world - 1 - r) and acc + costs[end] / 2 <= target:
            acc += costs[end]
            end += 1
        bounds.append(range(start, end))
        start = end
    bounds.append(range(start, n))
    return bounds


def init_shard(costs: Sequence[float], *, device: str = "auto") -> Shard:
    """Join the process group that ``torchrun`` describes (if any) and take this rank's layers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and join_group(cuda=use_cuda):
        log.info("rank %d of %d on %s", rank, world, dev)
    ranges = split_layers(costs, world)
    return Shard(rank=rank, world=world, layers=ranges[rank], device=dev)


def join_group(*, cuda: bool, timeout: datetime.timedelta | None = None) -> bool:
    """Join the process group that ``torchrun`` describes (NCCL on GPUs, gloo otherwise), once per process: the group
    lives until the process exits, so that the stages of one run reuse it. Whether this call created it."""
    if dist.is_initialized():
        return False
    dist.init_process_group(backend="nccl" if cuda else "gloo", **({} if timeout is None else {"timeout": timeout}))
    atexit.register(_destroy)
    return True


def close_shard(shard: Shard) -> None:
    """End of a stage: wait for every rank (the group itself lives until the process exits)."""
    if shard.world > 1 and dist.is_initialized():
        dist.barrier()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
