"""The process group a search runs in: one process, or the ranks ``torchrun`` starts.

    torchrun --nproc-per-node 2 -m puzzle.cli.main search --model DIR --cluster 2xcpu --max-memory-per-rank 6GiB

Every rank runs :func:`puzzle.search.search`. Rank 0 alone decides whether a stage runs or is
skipped, writes the run's files and manifests, and runs the stages that need one process
(profile, export); the stages that shard (library, BLD, scoring, the finalists, child-aware BLD,
fusion, GKD, evaluation) run on every rank between two barriers, so rank 0 records a stage's files only after
every rank has written its part. Results reach the other ranks by broadcast. gloo on the CPU,
NCCL on GPUs (torch.distributed); the timeout is long, since ranks wait while rank 0 works alone.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from block_library.distributed import Shard as Group
from block_library.distributed import join_group

__all__ = ["TIMEOUT", "Group", "join"]

TIMEOUT = datetime.timedelta(hours=float(os.environ.get("PUZZLE_DIST_TIMEOUT_HOURS", "12")))
"""How long a rank waits in a collective (the others may be waiting for rank 0 to finish a stage alone)."""


def join() -> Group:
    """This process's place in ``torchrun``'s group (joined here, once), or a group of one.

    The search's group is the stages' :class:`~block_library.distributed.Shard` without layers: the stages that
    shard join the same process group and take their layers themselves."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        cuda = torch.cuda.is_available()
        if cuda and not dist.is_initialized():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        join_group(cuda=cuda, timeout=TIMEOUT)
    return Group(rank=rank, world=world)
