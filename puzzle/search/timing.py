"""Predicted seconds of the search's stages: the profiler's op counts at each stage's own batch shapes.

A stage's time is the kernels it runs, not its parameter count times a flat rate: at 256 tokens the
attention's scores, the norms, the residuals and the per-kernel cost of eager PyTorch matter beside the
GEMMs, the vocabulary-wide passes of a log-softmax and a KL are memory-bound, and the ranks of a
layer-sharded pass wait for each other. :class:`Clock` prices each piece on one rank:

    clock = rank_clock(cluster, config)          # this cluster's rank, the parent's shape
    clock.blocks(config.blocks, batch=8, seq=256) # a forward pass of the decoder (seconds)
    clock.head(rows=2 * 255, work=VOCAB_METRIC)   # the LM head and the metrics over its (rows, V) logits
    pipeline([w0, w1], micro=2)                   # two ranks' work per micro-batch, passed rank to rank

On the CPU a rank's target is this CPU at the rank's thread count (``OMP_NUM_THREADS`` under torchrun),
its peaks measured once and cached (:mod:`puzzle.profiler.cpu`), at the fractions of them that eager
training and scoring kernels reach (:data:`CPU_STAGE_EFFICIENCY`, fitted on
``benchmarks/profiler_fidelity.py``'s blocks). On GPUs the clock keeps the flat rate (35% of the bf16
peak, :data:`~puzzle.search.cluster.TRAIN_EFFICIENCY`) over the parameters' FLOPs until a GPU run calibrates it.

The constants below are fitted on quiet runs of this machine's searches (``benchmarks/results/
end_to_end.csv``, ``scale.csv``; ``benchmarks/README.md`` quotes predicted against measured per stage).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Clock", "rank_clock", "pipeline", "variant_config", "KAPPA", "VOCAB_LOGSOFTMAX", "VOCAB_TOPK",
           "VOCAB_METRIC", "VOCAB_LOSS"]

KAPPA = 3.0
"""A training step's forward and backward over the forward alone (the backward computes two GEMMs per GEMM)."""
VOCAB_LOGSOFTMAX = 520.0
"""Work of a fp32 log-softmax per (row, vocabulary) element, in FLOP-equivalents at the rank's GEMM rate: the exp and
log make it compute-bound on the CPU (measured 4.8 ns an element on one thread of this machine, 3.0 on two: 490-550
FLOPs of its GEMM rate either way)."""
VOCAB_TOPK = 790.0
"""A log-softmax and the top-k of the teacher's targets (the top-64 alone: 260-290)."""
VOCAB_METRIC = 1650.0
"""A log-softmax, then KL (an exp), NLL, two argmaxes and a gather over the vocabulary: the quality metrics
(:class:`puzzle.scoring.metrics.TokenSums`: 10.9 ns an element on one thread, 6.3 on two)."""
VOCAB_LOSS = 900.0
"""GKD's loss forward over the vocabulary: log-softmax, the KL on the top-k and the rest, the LM loss."""
OPTIMIZER_PASSES = 16.0
"""fp32 passes over the trained parameters per AdamW step with the norm clip and the zeroed gradients."""
CPU_STAGE_EFFICIENCY = {"compute": 0.75, "memory": 1.158, "overlap": 0.0}
"""Fractions of the CPU's measured peaks (GEMM FLOP/s, copy bandwidth) that eager training and scoring kernels reach,
and no overlap of compute and memory traffic. The memory fraction and the overlap are the fit of
``profiler_fidelity.csv``'s timed blocks on this machine; the compute fraction is that fit's 0.655 raised to
0.75 by whole stages (``stage_times.csv``: the 1.24 B proof's larger GEMMs and SmolLM2 at batch 8 run nearer the
peak than serving-sized blocks). The per-kernel cost is the one measured at the rank's thread count."""
MULTI_THREAD_COMPUTE = 0.6
"""The compute fraction of a rank of two threads or more: eager kernels of training shapes split less well over
threads than the large GEMM that measures the peak (SmolLM2's quick stages on two threads took 1.2-1.5x a
one-thread-efficiency plan; measured on 1 and 2 threads only)."""
FP64_SLOWDOWN = 2.0
"""float64 GEMMs (the refits' Gram matrices) against float32: half the SIMD lanes."""
MODULE_SECONDS_PER_PARAM = {"library": 80e-9, "bld": 120e-9}
"""Building, initializing, copying and writing a variant's modules, per parameter (library: every variant a
rank owns, the parent's own copies included; BLD: every trained one): the measured stage time beyond its
kernels on SmolLM2 and the 1B shape, divided by the parameters."""
ASSEMBLY_BYTES_PER_S = 0.64e9
"""Assembling a child from the library's files (read, build, load state), per fp32 weight byte."""


@dataclass(frozen=True)
class Clock:
    """Seconds of work on one rank. ``target``: the rank's fitted target (None: the flat rate ``flops``)."""

    target: Any
    flops: float
    """FLOP/s of the flat rate (GPUs), and of the GEMM-bound work every clock prices by its FLOPs."""
    shape: Any
    """The parent's :class:`~puzzle.profiler.counts.ModelShape`."""
    memo: dict[tuple[Any, int, int], float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def dtype(self) -> str:
        return "fp32" if self.target is None or self.target.is_cpu else "bf16"

    def block(self, block: Any, batch: int, seq: int) -> float:
        """A decoder block's forward over ``batch`` sequences of ``seq`` tokens."""
        return _block_seconds(self, block, batch, seq)

    def blocks(self, blocks: Iterable[Any], batch: int, seq: int) -> float:
        return sum(self.block(b, batch, seq) for b in blocks)

    def sub(self, subblock: str, cfg: Any, batch: int, seq: int) -> float:
        """One sub-block (``attention`` or ``ffn``) alone, the other half a no-op."""
        from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

        block = BlockConfig(attention=cfg, ffn=FFNConfig.no_op()) if subblock == "attention" else \
            BlockConfig(attention=AttentionConfig.no_op(), ffn=cfg)
        return self.block(block, batch, seq)

    def variant(self, v: Any, config: Any, batch: int, seq: int) -> float:
        """A library variant (:class:`block_library.memory.VariantSize`) alone."""
        return self.sub(v.subblock, variant_config(v, config), batch, seq)

    def head(self, rows: float, work: float) -> float:
        """The LM head over ``rows`` positions, then ``work`` FLOP-equivalents per logit (``VOCAB_*``) over them."""
        from puzzle.profiler.counts import gemm
        from puzzle.profiler.roofline import ops_ms

        H, V = self.shape.hidden_size, self.shape.vocab_size
        if self.target is None:
            return 2.0 * rows * H * V / self.flops
        return ops_ms([gemm("lm_head", rows, H, V, self.dtype)], self.target) / 1e3 + rows * V * work / self.flops

    def optimizer(self, params: float) -> float:
        """AdamW, the norm clip and the zeroed gradients over ``params`` fp32 parameters (memory-bound)."""
        return self.memory(OPTIMIZER_PASSES * 4.0 * params)

    def memory(self, nbytes: float) -> float:
        """``nbytes`` through memory (reads plus writes) at the rank's streaming rate."""
        if self.target is None:
            return 0.0
        acc = self.target.accelerator
        return nbytes / (acc.bandwidth * acc.efficiency.memory)

    def modules(self, params: float, stage: str) -> float:
        """Building, initializing and writing ``params`` parameters' modules on the CPU
        (:data:`MODULE_SECONDS_PER_PARAM`; counted in a GPU's flat rate)."""
        return 0.0 if self.target is None else MODULE_SECONDS_PER_PARAM[stage] * params

    def gemm(self, flops: float, *, fp64: bool = False) -> float:
        """GEMM-bound work counted in FLOPs (a Gram matrix, a solve)."""
        return flops / self.flops * (FP64_SLOWDOWN if fp64 else 1.0)


def _block_seconds(clock: Clock, block: Any, batch: int, seq: int) -> float:
    from puzzle.profiler.counts import block_ops, block_params
    from puzzle.profiler.roofline import ops_ms
    from puzzle.profiler.scenario import Scenario

    key = (block, batch, seq)
    if key not in clock.memo:
        if clock.target is None:
            clock.memo[key] = 2.0 * block_params(clock.shape, block) * batch * seq / clock.flops
        else:
            sc = Scenario(name="train", phase="prefill", batch=batch, length=seq)
            clock.memo[key] = ops_ms(block_ops(clock.shape, block, sc, dtype=clock.dtype), clock.target) / 1e3
    return clock.memo[key]


def pipeline(work: Sequence[float], micro: int) -> float:
    """Wall time of ``micro`` micro-batches through ranks that do ``work[r]`` seconds each per micro-batch and pass
    it on (blocking send and receive, in order): the first one through every rank, the rest at the slowest's pace."""
    work = [w for w in work if w > 0]
    if not work or micro < 1:
        return 0.0
    return sum(work) + (micro - 1) * max(work)


def variant_config(v: Any, config: Any) -> Any:
    """The :class:`~puzzle.schema.AttentionConfig` / :class:`~puzzle.schema.FFNConfig` of a library variant's size."""
    from puzzle.schema import AttentionConfig, FFNConfig

    if v.subblock == "attention":
        if v.kind == "gqa":
            return AttentionConfig.gqa(max(1, (v.width // config.head_dim - config.num_attention_heads) // 2))
        return AttentionConfig.linear() if v.kind == "linear" else AttentionConfig.no_op()
    if v.kind == "swiglu":
        return FFNConfig.swiglu(v.width)
    return FFNConfig.linear() if v.kind == "linear" else FFNConfig.no_op()


def rank_clock(cluster: Any, config: Any) -> Clock:
    """The clock of one of ``cluster``'s ranks for a parent of ``config``'s shape."""
    from puzzle.profiler.counts import ModelShape

    return _clock(cluster.is_cpu, cluster.threads, cluster.flops_per_rank, ModelShape.from_config(config))


@functools.lru_cache(maxsize=64)
def _clock(cpu: bool, threads: int, flops: float, shape: Any) -> Clock:
    if not cpu:
        return Clock(None, flops, shape)
    target = cpu_rank_target(threads)
    acc = target.accelerator
    return Clock(target, acc.peak_flops("fp32") * acc.efficiency.compute["fp32"], shape)


def cpu_rank_target(threads: int) -> Any:
    """This CPU at ``threads`` torch threads, at :data:`CPU_STAGE_EFFICIENCY` of its peaks: the peaks cached for
    that thread count (:func:`puzzle.profiler.cpu.cached_peaks`), else this process's scaled by the thread ratio."""
    import torch

    from puzzle.profiler.cpu import cached_peaks
    from puzzle.profiler.devices import CPU, Accelerator, Efficiency, Target

    peaks = cached_peaks(threads)
    if peaks is None:
        from puzzle.profiler.cpu import fp32_flops

        own = cached_peaks(torch.get_num_threads())
        scale = threads / max(1, torch.get_num_threads())
        peaks = {"fp32_flops": fp32_flops() * scale,
                 "bandwidth": (own["bandwidth"] if own else 1.0e10) * scale,
                 "kernel_overhead_us": (own["kernel_overhead_us"] if own else 5.0)}
    compute = CPU_STAGE_EFFICIENCY["compute"] if threads <= 1 else MULTI_THREAD_COMPUTE
    eff = Efficiency(compute={"fp32": compute}, memory=CPU_STAGE_EFFICIENCY["memory"],
                     kernel_overhead_us=float(peaks["kernel_overhead_us"]), link=1.0, allreduce_latency_us=0.0,
                     overlap=CPU_STAGE_EFFICIENCY["overlap"])
    acc = Accelerator(name=CPU, tflops={"fp32": float(peaks["fp32_flops"]) / 1e12}, memory_gb=0.0,
                      bandwidth_tbs=float(peaks["bandwidth"]) / 1e12, link_gbs=0.0, efficiency=eff)
    return Target(accelerator=acc, dtype="fp32")


def batches(sequences: int, batch: int) -> tuple[int, int]:
    """``(batch size, batch count)`` of ``sequences`` read ``batch`` at a time."""
    b = max(1, min(batch, sequences))
    return b, max(1, math.ceil(sequences / b))
