"""Devices and deployments as plain data: a device type's peaks and efficiencies, and a target of them.

An :class:`Accelerator` is one device type (its datasheet peaks, or this CPU's measured ones, and the
:class:`Efficiency` kernels reach on it); a :class:`Target` is ``count`` of them serving one model in
one dtype, ``tensor_parallel`` per replica. This module knows no device by name and reads no string:
the catalog of known accelerators and the one parser of target strings are in
:mod:`puzzle.profiler.hardware`, which re-exports everything here. The cost model (``counts``,
``roofline``, ``fit``) and the CPU measurement (``cpu``) import from here, below that parser.

:class:`Efficiency`'s GPU defaults were read off ``h100_measured.csv`` (the calibration points this
project ships, ``puzzle/profiler/data/``): a large BF16 GEMM reaches 787.3 / 989.4 = 0.796 of the
peak, FP8 1421.7 / 1978.9 = 0.718, and streaming reaches 2.99 / 3.35 = 0.89 of the bandwidth. The
same fractions are assumed for the other GPUs until a measured calibration (``puzzle profile
--measure`` on that GPU) replaces them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from puzzle.errors import UnknownTargetError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
"""Bytes per weight element for each serving dtype."""
CPU = "cpu"
"""Name of the accelerator that is this machine's CPU (and of its target)."""


@dataclass(frozen=True, kw_only=True)
class Efficiency:
    """Fractions of the datasheet peaks that kernels reach, and fixed per-kernel costs."""

    compute: Mapping[str, float] = field(default_factory=lambda: {"bf16": 0.796, "fp8": 0.718})
    """Per dtype: achieved / peak FLOP/s of a large GEMM."""
    memory: float = 0.89
    """Achieved / peak memory bandwidth when streaming weights, activations or KV cache."""
    kernel_overhead_us: float = 0.25
    """Fixed cost per kernel of the eager runtime's count, in microseconds. On GPUs the lean runtime
    (CUDA graphs / torch.compile) fuses the ~39 eager kernels of a layer into about 10 of ~1 us each,
    hence 0.25 us per eager kernel; on the CPU it is the eager dispatch cost, fitted by ``--measure``."""
    overlap: float = 1.0
    """How far an op's compute hides its memory traffic: 1 = fully (time is the larger of the two,
    the roofline; GPUs), 0 = not at all (time is their sum; CPU GEMMs pack weight panels before
    computing on them). Fitted by ``--measure`` on the CPU."""
    link: float = 0.8
    """Achieved / peak GPU-to-GPU bandwidth in an all-reduce."""
    allreduce_latency_us: float = 8.0
    """Fixed latency of one all-reduce (NCCL small-message latency on NVLink)."""

    def replace(self, **changes: object) -> Efficiency:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "compute": dict(self.compute)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Efficiency:
        return cls(**{**data, "compute": dict(data["compute"])})  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class Accelerator:
    """One device type: its peaks and the efficiencies reached on it."""

    name: str
    """Canonical name, e.g. ``H100-SXM``."""
    tflops: Mapping[str, float]
    """Dense peak TFLOP/s per dtype (a dtype missing here is not supported)."""
    memory_gb: float
    """Device memory in GB (1e9 bytes), as datasheets give it."""
    bandwidth_tbs: float
    """Peak memory bandwidth, TB/s (1e12 bytes/s)."""
    link_gbs: float = 0.0
    """GPU-to-GPU bandwidth per direction, GB/s (NVLink; PCIe where there is none)."""
    efficiency: Efficiency = field(default_factory=Efficiency)

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; :class:`UnknownTargetError` if it has no such units."""
        if dtype not in self.tflops:
            raise UnknownTargetError(f"{self.name} does not support {dtype}; it supports {sorted(self.tflops)}")
        return self.tflops[dtype] * 1e12

    @property
    def bandwidth(self) -> float:
        """Peak memory bandwidth in bytes/s."""
        return self.bandwidth_tbs * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


@dataclass(frozen=True, kw_only=True)
class Target:
    """What the child is served on: ``count`` devices of one kind, ``tensor_parallel`` per replica, in ``dtype``.

    ``8xH100`` is one node of eight GPUs: ``tensor_parallel`` of them share every layer (weights and
    heads split across them) and the other ``count // tensor_parallel`` groups serve replicas.
    :func:`puzzle.profiler.deployment.choose_tensor_parallel` picks the degree for a model.
    """

    accelerator: Accelerator
    count: int = 1
    """Devices of the target (``8xH100``: 8)."""
    dtype: str = "bf16"
    """Weight and GEMM dtype: ``bf16`` or ``fp8`` on GPUs, ``fp32`` (or ``bf16``) on the CPU."""
    tensor_parallel: int | None = None
    """Devices sharing every layer of one replica. The default (and what the parser gives) is all ``count``,
    until :func:`~puzzle.profiler.deployment.choose_tensor_parallel` picks the degree for a model."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise UnknownTargetError(f"the device count must be >= 1, got {self.count}")
        if self.tensor_parallel is None:
            object.__setattr__(self, "tensor_parallel", self.count)
        if not 1 <= self.tensor_parallel <= self.count:  # type: ignore[operator]
            raise UnknownTargetError(f"tensor parallelism must be between 1 and the {self.count} devices of the "
                                     f"target, got {self.tensor_parallel}")
        self.accelerator.peak_flops(self.dtype)  # raises for an unsupported dtype

    @property
    def is_cpu(self) -> bool:
        return self.accelerator.name == CPU

    @property
    def tp(self) -> int:
        """Tensor-parallel degree of one replica."""
        return int(self.tensor_parallel)  # type: ignore[arg-type]

    @property
    def replicas(self) -> int:
        """Model copies served side by side: the devices not in one tensor-parallel group form more groups."""
        return self.count // self.tp

    @property
    def name(self) -> str:
        """``8xH100-SXM:bf16`` / ``8xH100-SXM:tp1:bf16`` (tensor parallelism below the count) / ``cpu:fp32``."""
        prefix = CPU if self.is_cpu else f"{self.count}x{self.accelerator.name}"
        tp = f":tp{self.tp}" if self.tp != self.count else ""
        return f"{prefix}{tp}:{self.dtype}"

    def with_tensor_parallel(self, tp: int) -> Target:
        return dataclasses.replace(self, tensor_parallel=tp)

    def to_dict(self) -> dict[str, object]:
        """What a plan records: ``accelerator``, ``count``, ``tensor_parallel``, ``replicas``, ``dtype``."""
        return {"accelerator": self.accelerator.name, "count": self.count, "tensor_parallel": self.tp,
                "replicas": self.replicas, "dtype": self.dtype, "name": self.name}

    def with_efficiency(self, efficiency: Efficiency) -> Target:
        acc = dataclasses.replace(self.accelerator, efficiency=efficiency)
        return dataclasses.replace(self, accelerator=acc)
