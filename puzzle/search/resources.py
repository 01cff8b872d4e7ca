"""What a stage's resource model returns (memory, disk and time on every rank), and the pieces they share.

    from puzzle.search import SearchConfig, resolve
    plan = resolve(SearchConfig(model="llama-3.1-70b", cluster="8xH100"))
    plan.resources.stage("bld")   # peak device GiB on the largest rank, host GiB, rounds, predicted s
    plan.resources.fits           # False: plan.resources.problem says which stage and the smallest cluster

Each stage's model sits in its file (``puzzle/search/stages/<name>.py``, ``Stage.resources``) and is
closed form, from the parent's ``config.json`` (or a shape name) alone: parameters per layer and
variant (:mod:`block_library.memory`), the stage's settings, and the cluster's per-rank memory and
FLOP/s (:mod:`puzzle.search.cluster`). :mod:`puzzle.search.resource_plan` runs them all.

The child's size is unknown until the MIP has run: stages after it are planned for a child as large
as the parent, an upper bound (:attr:`Shapes.child` is None), and planned again for the chosen child
when the run records what it used. Predicted times divide each stage's FLOPs by the rank's achieved
FLOP/s (:data:`puzzle.search.cluster.TRAIN_EFFICIENCY`); they are estimates for planning, good to a
factor of about two, and ``benchmarks/scale.py`` compares them with runs.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from block_library.memory import PROCESS_BYTES, LayerSizes, embedding_params, layer_costs
from puzzle.search.cluster import Cluster

GIB = 2**30
SEQ_LEN = 256
"""Tokens per training and evaluation sequence of the stages (BLD, child-aware BLD, fusion, GKD, evaluation)."""
BLD_BATCH = 8
"""Sequences per BLD step."""


@dataclass(frozen=True)
class RankUse:
    """One rank in one stage."""

    rank: int
    layers: tuple[int, int]
    """``(first, last + 1)`` of the layers it holds; ``(0, 0)`` for none."""
    device_bytes: float
    host_bytes: float
    disk_bytes: float
    seconds: float
    rounds: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "layers": list(self.layers), "peak_device_gib": self.device_bytes / GIB,
                "peak_host_gib": self.host_bytes / GIB, "disk_gib": self.disk_bytes / GIB,
                "predicted_s": self.seconds, "rounds": self.rounds}


@dataclass(frozen=True)
class StageUse:
    """One stage on every rank; the figures a plan prints are the largest rank's."""

    stage: str
    how: str
    """How the stage uses the ranks, in a few words."""
    ranks: tuple[RankUse, ...]
    limit_bytes: float
    host_limit_bytes: float
    note: str = ""

    @property
    def peak_device_bytes(self) -> float:
        return max(r.device_bytes for r in self.ranks)

    @property
    def peak_host_bytes(self) -> float:
        return max(r.host_bytes for r in self.ranks)

    @property
    def disk_bytes(self) -> float:
        return sum(r.disk_bytes for r in self.ranks)

    @property
    def seconds(self) -> float:
        return max(r.seconds for r in self.ranks)

    @property
    def rounds(self) -> int:
        return max(r.rounds for r in self.ranks)

    @property
    def fits(self) -> bool:
        return (self.peak_device_bytes <= self.limit_bytes * (1 + 1e-9)
                and self.peak_host_bytes <= self.host_limit_bytes * (1 + 1e-9))

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "how": self.how, "peak_device_gib": self.peak_device_bytes / GIB,
                "peak_host_gib": self.peak_host_bytes / GIB, "disk_gib": self.disk_bytes / GIB,
                "predicted_s": self.seconds, "rounds": self.rounds, "fits": self.fits, "note": self.note,
                "ranks": [r.to_dict() for r in self.ranks]}


CLUSTER_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
"""Rank counts tried when looking for the smallest cluster that fits."""


@dataclass(frozen=True)
class ResourcePlan:
    cluster: Cluster
    stages: tuple[StageUse, ...]
    smallest: str | None = None
    """When a stage does not fit: the smallest cluster of the same device that fits every stage."""
    problems: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def problem(self) -> str | None:
        """One line: the first stage that does not fit, and the smallest cluster that does."""
        if not self.problems:
            return None
        where = (f"; the smallest {self.cluster.device} cluster that fits is {self.smallest}" if self.smallest
                 else f"; no cluster of up to {CLUSTER_SIZES[-1]}x{self.cluster.device} fits")
        return self.problems[0] + where

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.stage for s in self.stages)

    def stage(self, name: str) -> StageUse:
        return next(s for s in self.stages if s.stage == name)

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster.to_dict(), "fits": self.fits, "problem": self.problem,
                "smallest_cluster": self.smallest, "predicted_s": self.seconds,
                "stages": [s.to_dict() for s in self.stages]}


@dataclass(frozen=True)
class Shapes:
    """What every stage's resource model reads besides its settings and the cluster."""

    parent: Any
    """The parent's runtime config (:class:`puzzle.model.PuzzleConfig`)."""
    layers: tuple[LayerSizes, ...]
    """Parameters of every layer's parent sub-blocks and library variants (:func:`block_library.memory.layer_sizes`)."""
    child: Any = None
    """The child's config once the MIP has chosen it; None before (the parent stands in, an upper bound)."""

    @property
    def child_config(self) -> Any:
        return self.child if self.child is not None else self.parent

    @property
    def child_params(self) -> int:
        from puzzle.summary import totals

        return totals(self.child_config).params

    @property
    def parent_params(self) -> int:
        """Parameters of the whole parent (and of the largest child it can have)."""
        config = self.parent
        head = 0 if config.tie_word_embeddings else embedding_params(config)
        return sum(s.parent_params for s in self.layers) + embedding_params(config) + head + config.hidden_size


# ------------------------------------------------------------------------------------- shared pieces


def host_bytes(cluster: Cluster, device_bytes: float, staged: float = 0.0) -> float:
    """Host memory of a rank whose device holds ``device_bytes``: the same memory on the CPU; on a GPU the
    process and ``staged``, the weights it reads into host memory (fp32) before moving them to the device."""
    return device_bytes if cluster.is_cpu else PROCESS_BYTES + staged


def base_bytes(cluster: Cluster) -> float:
    """A rank that holds nothing: the process (and its CUDA context on a GPU)."""
    from block_library.memory import CUDA_CONTEXT_BYTES

    return PROCESS_BYTES if cluster.is_cpu else CUDA_CONTEXT_BYTES


def device_kind(cluster: Cluster) -> str:
    return "cpu" if cluster.is_cpu else "cuda"


def one_rank(cluster: Cluster, *, device: float, seconds: float, disk: float = 0.0,
             layers: tuple[int, int] = (0, 0), host: float | None = None) -> list[RankUse]:
    """Rank 0's use in a stage that runs on it alone (``host``: its host memory where it is not the device's)."""
    return [RankUse(0, layers, device, host_bytes(cluster, device) if host is None else host, disk, seconds)]


def stage_use(name: str, how: str, ranks: list[RankUse], cluster: Cluster, note: str = "") -> StageUse:
    """The stage's use of every rank: ``ranks`` as given, the ranks after them idle. A stage ends on every rank at
    once (the ranks meet at its end), so each working rank is given the stage's time: the slowest rank's."""
    b, wall = base_bytes(cluster), max((r.seconds for r in ranks), default=0.0)
    ranks = [dataclasses.replace(r, seconds=wall) if r.seconds > 0 else r for r in ranks]
    ranks = ranks + [RankUse(r, (0, 0), b, host_bytes(cluster, b), 0.0, 0.0) for r in range(len(ranks), cluster.count)]
    return StageUse(name, how, tuple(ranks), cluster.memory_per_rank, cluster.host_per_rank, note)


def layer_ranges(layers: Sequence[LayerSizes], world: int) -> list[range]:
    """The layers each rank holds in the library stages, split by their cost."""
    from block_library.distributed import split_layers

    return split_layers(layer_costs(layers), min(world, len(layers)))


def layer_range(r: range) -> tuple[int, int]:
    return (r.start, r.stop)


def round_params(items: list[tuple[str, int]], budget: float, bytes_per_param: int) -> list[int]:
    """Params per round, as :func:`block_library.rounds.plan_rounds` packs them; where a lone variant does
    not fit, one variant per round (the stage then reports that it does not fit)."""
    from block_library.rounds import plan_rounds
    from puzzle.errors import ResourceError

    params = dict(items)
    try:
        rounds = plan_rounds(items, budget, bytes_per_param=bytes_per_param)
    except ResourceError:
        return [p for _, p in items] or [0]
    return [sum(params[k] for k in r) for r in rounds] or [0]
