"""Hardware targets: the accelerators the profiler knows, the default target, and the one parser of target strings.

A target is ``COUNTxNAME`` (``8xH100``, ``1xH200``, ``4xB200``) or ``cpu`` / ``1xcpu`` (the machine
the profiler runs on), with a dtype (``bf16`` or ``fp8``; ``fp32`` on the CPU). The count is the
number of GPUs of one node (``8xH100`` is one node of eight), not a tensor-parallel degree:
:func:`puzzle.profiler.deployment.choose_tensor_parallel` picks how many of them share every layer
for a given model, and the others serve replicas. :func:`parse_target` is the only reader of these
strings and :data:`DEFAULT_TARGET` the only default: every command that takes a target uses both.

Datasheet figures are dense (no 2:4 sparsity) tensor-core FLOP/s, HBM capacity and bandwidth,
and GPU-to-GPU bandwidth per direction; the fractions of those peaks that real kernels reach are
the :class:`Efficiency` defaults (:mod:`puzzle.profiler.devices`, which holds the data classes
re-exported here).
"""

from __future__ import annotations

import re

from puzzle.errors import UnknownTargetError
from puzzle.profiler import cpu
from puzzle.profiler.devices import CPU, DTYPE_BYTES, Accelerator, Efficiency, Target

__all__ = ["ACCELERATORS", "ALIASES", "CPU", "DEFAULT_TARGET", "DTYPE_BYTES", "Accelerator", "Efficiency", "Target",
           "known_targets", "lookup_accelerator", "parse_target"]

DEFAULT_TARGET = "8xH100"
"""The target of every command that takes one (``puzzle profile``, ``puzzle fuse``, ``puzzle search`` /
``plan``): one node of eight H100s."""

# Dense tensor-core peaks (NVIDIA datasheets; SXM parts), HBM, NVLink per direction.
ACCELERATORS: dict[str, Accelerator] = {
    "A100-80GB": Accelerator(name="A100-80GB", tflops={"bf16": 312.0}, memory_gb=80, bandwidth_tbs=2.039,
                             link_gbs=300),
    "H100-SXM": Accelerator(name="H100-SXM", tflops={"bf16": 989.4, "fp8": 1978.9}, memory_gb=80,
                            bandwidth_tbs=3.35, link_gbs=450),
    "H200": Accelerator(name="H200", tflops={"bf16": 989.4, "fp8": 1978.9}, memory_gb=141, bandwidth_tbs=4.8,
                        link_gbs=450),
    "B100": Accelerator(name="B100", tflops={"bf16": 1750.0, "fp8": 3500.0}, memory_gb=192, bandwidth_tbs=8.0,
                        link_gbs=900),
    "B200": Accelerator(name="B200", tflops={"bf16": 2250.0, "fp8": 4500.0}, memory_gb=192, bandwidth_tbs=8.0,
                        link_gbs=900),
    # L40S has no NVLink: tensor-parallel traffic crosses PCIe Gen4 x16 (about 32 GB/s per direction).
    "L40S": Accelerator(name="L40S", tflops={"bf16": 362.05, "fp8": 733.0}, memory_gb=48, bandwidth_tbs=0.864,
                        link_gbs=32),
}
ALIASES = {"A100": "A100-80GB", "A100-SXM": "A100-80GB", "H100": "H100-SXM", "H100-80GB": "H100-SXM"}


def known_targets() -> list[str]:
    """Names the parser accepts (``cpu`` plus every accelerator and alias)."""
    return [CPU, *ACCELERATORS, *ALIASES]


def lookup_accelerator(name: str) -> Accelerator:
    by_upper = {k.upper(): k for k in ACCELERATORS} | {k.upper(): v for k, v in ALIASES.items()}
    key = by_upper.get(name.strip().upper())
    if key is None:
        raise UnknownTargetError(f"unknown accelerator {name!r}; known: {', '.join(known_targets())}")
    return ACCELERATORS[key]


_BUDGET = re.compile(r"^\s*(?:(?P<n>\d+)\s*[xX*]\s*)?(?P<name>[A-Za-z][\w.-]*)\s*$")


def parse_target(text: str, *, dtype: str | None = None) -> Target:
    """``"8xH100"`` -> one node of eight H100s; ``"cpu"`` -> this machine (measured once, cached).

    ``dtype`` defaults to ``bf16`` on GPUs and ``fp32`` on the CPU. The target's ``tensor_parallel`` is
    all its devices until :func:`~puzzle.profiler.deployment.choose_tensor_parallel` picks the degree
    for a model. :class:`UnknownTargetError` names the known accelerators for an unreadable string.
    """
    m = _BUDGET.match(text or "")
    if m is None:
        raise UnknownTargetError(f"cannot read target {text!r}; write COUNTxNAME such as 8xH100, 1xH200, 4xB200, "
                                 f"or cpu (known: {', '.join(known_targets())})")
    count = int(m.group("n") or 1)
    if dtype is not None and dtype not in DTYPE_BYTES:
        raise UnknownTargetError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    if m.group("name").lower() == CPU:
        if count != 1:
            raise UnknownTargetError(f"target {text!r}: the cpu target is this one machine; write just 'cpu'")
        return Target(accelerator=cpu.cpu_accelerator(), count=1, dtype=dtype or "fp32")
    return Target(accelerator=lookup_accelerator(m.group("name")), count=count, dtype=dtype or "bf16")
