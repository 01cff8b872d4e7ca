"""The process group a search runs in: one process, or the ranks ``torchrun`` starts.

    torchrun --nproc-per-node 2 -m puzzle.cli.main search --model DIR --cluster 2xcpu --max-memory-per-rank 6GiB

Every rank runs :func:`puzzle.search.search`. Rank 0 alone decides whether a stage runs or is
skipped, writes the run's files and manifests, and runs the stages that need one process
(profile, solve, assembly, export); the stages that shard (library, BLD, scoring, GKD,
evaluation) run on every rank between two barriers, so rank 0 records a stage's files only after
every rank has written its part. Results reach the other ranks by broadcast. gloo on the CPU,
NCCL on GPUs (torch.distributed); the timeout is long, since ranks wait while rank 0 works alone.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

TIMEOUT = datetime.timedelta(hours=float(os.environ.get("PUZZLE_DIST_TIMEOUT_HOURS", "12")))


@dataclass(frozen=True)
class Group:
    rank: int
    world: int

    @property
    def first(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.first else None
        dist.gather_object(obj, out, dst=0)
        return out


def join() -> Group:
    """This process's place in ``torchrun``'s group (joined here, once), or a group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
            atexit.register(_leave)
    return Group(rank=rank, world=world)


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
