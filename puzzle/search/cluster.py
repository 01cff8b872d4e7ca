"""The machines that run a search (``--cluster``), as opposed to the ones the child is served on (``--budget``).

    parse_cluster("8xH100")                       # 8 ranks, one per GPU: 72 GB each (90% of 80 GB)
    parse_cluster("64xH100")                      # 8 nodes of 8
    parse_cluster("2xcpu", max_memory="6GiB")     # 2 processes on this machine, 6 GiB each

One rank per device: ``torchrun --nproc-per-node 8`` on each node of a GPU cluster,
``torchrun --nproc-per-node N`` on this machine for ``Nxcpu`` (the ranks share its cores and RAM).
A rank's memory limit (``--max-memory-per-rank``, default: the device's memory less a 10% margin;
on the CPU this machine's RAM less the margin, split between the ranks) is what BLD fills with
rounds of variants and what the resource plan checks every stage against.

``puzzle plan`` sizes any cluster; ``puzzle search`` runs on this machine, so it first checks that the
cluster's ranks have their devices here (:func:`check_here`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from block_library.rounds import parse_size
from puzzle.errors import ResourceError, UnknownTargetError

__all__ = ["Cluster", "parse_cluster", "parse_size", "default_cluster", "local_device", "check_here"]

MEMORY_MARGIN = 0.9
"""Fraction of a device's (or the machine's) memory a rank may fill."""
NODE_GPUS = 8
HOST_BYTES_PER_GPU = 2.0e12 / NODE_GPUS
"""Host RAM per GPU of a GPU node (a DGX H100 has 2 TB for 8 GPUs)."""
HOST_FP64_FLOPS_PER_GPU = 0.5 * 7.2e12 / NODE_GPUS
"""Float64 FLOP/s a GPU node's CPUs give one rank for the host-side linear algebra (the child-stream refit's
elimination when a GPU cannot hold its Gram): a DGX H100's two 56-core Xeon 8480C peak at about 7.2 TFLOP/s in
float64 (AVX-512, 2 FMA units), half of it reached, split over the node's 8 GPUs."""
TRAIN_EFFICIENCY = {"gpu": 0.35, "cpu": 0.5}
"""Fraction of the peak FLOP/s that training and scoring kernels reach (small GEMMs, eager PyTorch):
about 35% of the bf16 tensor-core peak on GPUs, half the measured fp32 GEMM rate on the CPU."""
DISK_BYTES_PER_S = 1.0e9
"""Sustained write (and cold read) rate of the run directory's disk."""

@dataclass(frozen=True, kw_only=True)
class Cluster:
    """``count`` ranks of one device kind, and what each rank may use."""

    device: str
    """``cpu`` or an accelerator name (``H100-SXM``)."""
    count: int
    memory_per_rank: float
    """Bytes a rank may fill on its device (the RAM share on the CPU)."""
    host_per_rank: float
    """Host RAM bytes per rank (equal to :attr:`memory_per_rank` on the CPU: one memory)."""
    flops_per_rank: float
    """FLOP/s a rank reaches in training and scoring kernels (fp32 on the CPU, bf16 on GPUs)."""
    given_memory: bool = False
    """True when ``--max-memory-per-rank`` set the limit."""
    threads: int = 0
    """torch threads of a CPU rank (:func:`rank_threads`); 0 on GPUs."""

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element the stages compute in: fp32 on the CPU, bf16 on GPUs."""
        return 4 if self.is_cpu else 2

    @property
    def name(self) -> str:
        return f"{self.count}x{self.device}"

    def with_count(self, count: int) -> Cluster:
        """The same kind of rank, ``count`` of them (on the CPU: this machine's RAM split ``count`` ways)."""
        if self.is_cpu and not self.given_memory:
            total = self.memory_per_rank * self.count
            threads = rank_threads(count)
            return dataclasses.replace(self, count=count, memory_per_rank=total / count, host_per_rank=total / count,
                                       flops_per_rank=cpu_rank_flops(threads), threads=threads)
        return dataclasses.replace(self, count=count)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "device": self.device, "ranks": self.count,
                "memory_per_rank_gib": self.memory_per_rank / 2**30, "host_per_rank_gib": self.host_per_rank / 2**30,
                "tflops_per_rank": self.flops_per_rank / 1e12}


_CLUSTER = re.compile(r"^\s*(?:(?P<n>\d+)\s*[xX*]\s*)?(?P<name>[A-Za-z][\w.-]*)\s*$")


def parse_cluster(text: str, *, max_memory: str | float | int | None = None) -> Cluster:
    """``8xH100`` / ``64xH100`` / ``2xcpu`` (ranks on this machine) -> a :class:`Cluster`."""
    from puzzle.profiler.hardware import CPU, known_targets, lookup_accelerator

    m = _CLUSTER.match(text or "")
    if m is None:
        raise UnknownTargetError(f"cannot read --cluster {text!r}; write COUNTxDEVICE such as 8xH100, 64xH100 or "
                                 f"2xcpu (known devices: {', '.join(known_targets())})")
    count = int(m.group("n") or 1)
    if count < 1:
        raise UnknownTargetError(f"--cluster {text!r}: the rank count must be >= 1")
    limit = None if max_memory is None else parse_size(max_memory)
    if m.group("name").lower() == CPU:
        from puzzle.profiler.cpu import total_ram_gb

        ram = total_ram_gb() * 1e9
        share = MEMORY_MARGIN * ram / count
        threads = rank_threads(count)  # the ranks share the cores
        memory = float(limit) if limit is not None else share
        return Cluster(device=CPU, count=count, memory_per_rank=memory, host_per_rank=memory,
                       flops_per_rank=cpu_rank_flops(threads), given_memory=limit is not None, threads=threads)
    acc = lookup_accelerator(m.group("name"))
    memory = float(limit) if limit is not None else MEMORY_MARGIN * acc.memory_bytes
    return Cluster(device=acc.name, count=count, memory_per_rank=memory, host_per_rank=HOST_BYTES_PER_GPU,
                   flops_per_rank=TRAIN_EFFICIENCY["gpu"] * acc.peak_flops("bf16"), given_memory=limit is not None)


def rank_threads(count: int) -> int:
    """torch threads each of ``count`` ranks on this CPU runs: this process's alone or under torchrun (where
    ``OMP_NUM_THREADS`` set them), else the cores split between the ranks (set ``OMP_NUM_THREADS`` to that)."""
    import os

    import torch

    if count == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or count) // count)


def cpu_rank_flops(threads: int) -> float:
    """FLOP/s a CPU rank of ``threads`` threads reaches in training kernels: :data:`TRAIN_EFFICIENCY` of the fp32
    GEMM peak measured at that thread count (this process's, scaled by the thread ratio, when never measured)."""
    import torch

    from puzzle.profiler.cpu import cached_peaks, fp32_flops

    peaks = cached_peaks(threads)
    peak = float(peaks["fp32_flops"]) if peaks else fp32_flops() * threads / max(1, torch.get_num_threads())
    return TRAIN_EFFICIENCY["cpu"] * peak


def default_cluster() -> str:
    """This process group as a cluster: ``torchrun``'s world size on this machine's device (``1xcpu`` alone)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"{world}x{local_device()}"


def local_device() -> str:
    """The accelerator this machine's ranks run on, by its CUDA name (``H100-SXM``), or ``cpu``."""
    import torch

    from puzzle.profiler.hardware import ACCELERATORS, ALIASES

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).upper()
    for key in sorted([*ACCELERATORS, *ALIASES], key=len, reverse=True):
        if key.split("-")[0] in name:
            return ALIASES.get(key, key)
    return "H100-SXM"  # an unknown GPU is planned as an H100; --cluster names it exactly


def check_here(cluster: Cluster, *, shown: str | None = None) -> None:
    """:class:`ResourceError` (one line naming what this machine has) unless the ranks ``cluster`` puts on
    this machine have their devices here.

    ``Nxcpu`` is N processes on this machine (``torchrun --nproc-per-node N``): at most one per core this
    process may run on (``os.sched_getaffinity``), or the ranks the plan budgets share fewer cores than it
    assumed. A GPU cluster needs its accelerator here, one per rank of this node: ``min(count, 8)`` (its
    other nodes are checked where they run). ``shown``: the cluster as the user wrote it."""
    import os

    flag = f"--cluster {shown or cluster.name}"
    cores = len(os.sched_getaffinity(0))
    where = "`puzzle plan` sizes any cluster without running it"
    if cluster.is_cpu:
        if cluster.count > cores:
            raise ResourceError(f"{flag} runs {cluster.count} processes on this machine, which has {cores} CPU "
                                f"core{'s' if cores != 1 else ''} for them: use --cluster {cores}xcpu or fewer "
                                f"({where})")
        return
    import torch

    if not torch.cuda.is_available():
        raise ResourceError(f"{flag} needs {cluster.device} GPUs and this machine has none, only {cores} CPU "
                            f"core{'s' if cores != 1 else ''}: search here with --cluster 1xcpu ({where})")
    here, count, name = local_device(), torch.cuda.device_count(), torch.cuda.get_device_name(0)
    ranks = min(cluster.count, NODE_GPUS)
    if here != cluster.device:
        raise ResourceError(f"{flag} plans {cluster.device} GPUs; this machine has {count} {name} ({here}): use "
                            f"--cluster {min(ranks, count)}x{here} ({where})")
    if count < ranks:
        raise ResourceError(f"{flag} runs {ranks} ranks on this machine, one per GPU, and it has {count} "
                            f"{here}: use --cluster {count}x{here} or fewer ({where})")
