"""Time from counts: a roofline per op, all-reduces from the link, and the runtime's host floor.

    op time      = max(t_compute, t_memory) + (1 - eff.overlap) * min(t_compute, t_memory)
                   + kernels * eff.kernel_overhead_us,
                   t_compute = FLOPs / (peak[dtype] * eff.compute[dtype]), t_memory = bytes / (bandwidth * eff.memory)
    all-reduce   = 2 (tp - 1) / tp * payload / (link * eff.link) + eff.allreduce_latency_us   (ring)
    step time    = sum of op times over the blocks + fixed ops            (runtime "lean")
                 = max(that, host time of the runtime)                    (runtime "hf-eager")

``lean`` is a runtime whose GPU is never starved: static KV cache and CUDA graphs or
torch.compile on GPUs, the plain eager path on the CPU (where kernels are slow enough to hide
the Python that launches them). ``hf-eager`` is Hugging Face's eager ``generate`` on a GPU,
whose step time is set by host-side work: in ``h100_measured.csv`` a decode step takes
~100 ms whether the model has 135 M or 8 B parameters, and a prefill ~1.1 ms per layer.
:data:`HF_EAGER` holds that host model, fitted to those points.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from puzzle.profiler.counts import ModelShape, Op, block_ops, fixed_ops
from puzzle.profiler.devices import Target
from puzzle.profiler.scenario import Scenario
from puzzle.schema import BlockConfig


@dataclass(frozen=True, kw_only=True)
class HostModel:
    """Host-side time per step of an overhead-bound runtime."""

    per_layer_ms: float
    """Python / dispatch time per decoder layer, whatever the layer computes."""
    decode_step_ms: float
    """Per decode step on top of the layers (sampling, cache bookkeeping, ``generate`` logic)."""
    prefill_step_ms: float

    def step_ms(self, sc: Scenario, num_layers: int) -> float:
        base = self.decode_step_ms if sc.phase == "decode" else self.prefill_step_ms
        return base + self.per_layer_ms * num_layers


# Least squares on the H100 hf_decode_step / hf_prefill points (SmolLM2 30 layers, Llama-3.2-1B 16,
# Llama-3.1-8B 32): decode 106.8 / 92.0 / 106.5 ms, prefill 33.0 / 18.7 / 35.6 ms.
HF_EAGER = HostModel(per_layer_ms=1.06, decode_step_ms=75.1, prefill_step_ms=2.4)
RUNTIMES = ("lean", "hf-eager")


def op_seconds(op: Op, target: Target) -> float:
    """Roofline time of one op on one rank of ``target`` (an all-reduce spans all ranks)."""
    acc, eff = target.accelerator, target.accelerator.efficiency
    if op.allreduce_bytes:
        if target.tp == 1:
            return 0.0
        ring = 2.0 * (target.tp - 1) / target.tp * op.allreduce_bytes / (acc.link_gbs * 1e9 * eff.link)
        return ring + eff.allreduce_latency_us * 1e-6
    compute_eff = eff.compute.get(op.dtype, eff.compute.get(target.dtype, 1.0))
    dtype = op.dtype if op.dtype in acc.tflops else target.dtype
    t_compute = op.flops / (acc.peak_flops(dtype) * compute_eff) if op.flops else 0.0
    t_memory = op.bytes / (acc.bandwidth * eff.memory) if op.bytes else 0.0
    overlapped = max(t_compute, t_memory) + (1.0 - eff.overlap) * min(t_compute, t_memory)
    return overlapped + op.kernels * eff.kernel_overhead_us * 1e-6


def ops_ms(ops: Iterable[Op], target: Target) -> float:
    return 1e3 * sum(op_seconds(op, target) for op in ops)


def block_ms(shape: ModelShape, block: BlockConfig, sc: Scenario, target: Target) -> float:
    """Predicted milliseconds of one block in one step of ``sc`` (per rank, all-reduces included)."""
    return ops_ms(block_ops(shape, block, sc, dtype=target.dtype, tp=target.tp), target)


def fixed_ms(shape: ModelShape, sc: Scenario, target: Target) -> float:
    """Embedding, final norm and LM head of one step."""
    return ops_ms(fixed_ops(shape, sc, dtype=target.dtype, tp=target.tp), target)


def model_ms(shape: ModelShape, blocks: Sequence[BlockConfig], sc: Scenario, target: Target, *,
             runtime: str = "lean") -> float:
    """Predicted milliseconds of one whole step of ``sc``."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    device = fixed_ms(shape, sc, target) + sum(block_ms(shape, b, sc, target) for b in blocks)
    if runtime == "hf-eager":
        return max(device, HF_EAGER.step_ms(sc, len(blocks)))
    return device
