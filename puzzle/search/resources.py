"""The resource plan: memory, disk and time of every stage on every rank, before any work is done.

    from puzzle.search import SearchConfig, resolve
    plan = resolve(SearchConfig(model="llama-3.1-70b", cluster="8xH100"))
    plan.resources.stages[1]      # BLD: peak device GiB on the largest rank, host GiB, rounds, predicted s
    plan.resources.fits           # False: plan.resources.problem says which stage and the smallest cluster

Counts are closed form, from the parent's ``config.json`` (or a shape name) alone: parameters per
layer and variant (:mod:`block_library.memory`), the stage sizes of the plan, and the cluster's
per-rank memory and FLOP/s (:mod:`puzzle.search.cluster`). How each stage uses ``W`` ranks:

=========  ==============================================================================
library    layers split over ranks (as BLD); each rank's variants initialized in rounds
bld        the same split; the rank's variants trained in rounds that fit its memory, each
           round replaying the teacher pass (:mod:`block_library.rounds`)
score      the same split; replacements stream through the ranks holding the later layers
profile    rank 0 (the cost table, and on the CPU timing a few blocks)
solve      rank 0 (the MIP)
fuse       rank 0, whole child in the compute dtype (runs only on GPU budgets)
gkd        FSDP2: student (fp32 master, grads, AdamW: 16 B/param) and teacher sharded W ways,
           one layer unsharded at a time; the optimizer state moves to host RAM when the
           device cannot hold it
export     rank 0, whole child in fp32 (stage reads the GKD child and writes DeciLM)
evaluate   rank 0, parent and child whole (quality), then each timed alone (speed)
=========  ==============================================================================

The child's size is unknown until the MIP has run: stages after it are planned for a child as
large as the parent, an upper bound. Predicted times divide each stage's FLOPs by the rank's
achieved FLOP/s (:data:`puzzle.search.cluster.TRAIN_EFFICIENCY`); they are estimates for
planning, good to a factor of about two, and ``benchmarks/scale.py`` compares them with runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from block_library.memory import (INIT_BYTES_PER_PARAM, PROCESS_BYTES, TRAIN_BYTES_PER_PARAM, LayerSizes,
                                  bld_fixed_bytes, build_fixed_bytes, embedding_params, gram_bytes, layer_costs,
                                  layer_sizes, round_items, train_peak_bytes_per_param)
from puzzle.search.cluster import DISK_BYTES_PER_S, Cluster

GIB = 2**30
CLUSTER_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
"""Rank counts tried when looking for the smallest cluster that fits."""


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
class Work:
    """What the stages process: the plan's sizes, as token counts."""

    bld_tokens: int
    seq_len: int = 256
    bld_batch: int = 8
    calib_sequences: int = 16
    val_sequences: int = 16
    score_sequences: int = 2
    score_seq_len: int = 128
    finalists: int = 1
    refine_rounds: int = 0
    child_bld_tokens: int = 0
    fuse: bool = False
    fuse_sequences: int = 4
    fuse_distill_steps: int = 100
    gkd_steps: int = 16
    gkd_batch: int = 2
    gkd_top_k: int = 0
    eval_sequences: int = 4
    measure_speed: bool = True
    cpu_calibrate: bool = False
    ffn_refit: bool = False
    child_refit: bool = False
    child: Any = None
    """The child's config once the MIP has chosen it (None before: the stages after the MIP are then
    planned for a child as large as the parent)."""

    @classmethod
    def from_plan(cls, plan: Any) -> Work:
        return cls(bld_tokens=plan.bld_tokens, calib_sequences=plan.bld_eval_sequences,
                   val_sequences=plan.bld_eval_sequences, score_sequences=plan.score_sequences, score_seq_len=plan.score_seq_len,
                   finalists=plan.finalists, refine_rounds=plan.refine_rounds or 0, child_bld_tokens=plan.child_bld_tokens, fuse=plan.fuse_threshold > 0, fuse_sequences=plan.fuse_sequences,
                   fuse_distill_steps=plan.fuse_distill_steps, gkd_steps=plan.gkd_steps, gkd_batch=plan.gkd_batch,
                   gkd_top_k=plan.gkd_top_k, eval_sequences=plan.eval_sequences, measure_speed=bool(plan.measure_speed),
                   cpu_calibrate=bool(plan.calibrate), ffn_refit=bool(plan.ffn_refit),
                   child_refit=bool(plan.child_refit))


# ------------------------------------------------------------------------------------------ the plan


def plan_resources(config: Any, work: Work, cluster: Cluster, *, space: Any = None, search: bool = True) -> ResourcePlan:
    """Every stage's use of ``cluster``; when one does not fit, the smallest cluster that does (``search``)."""
    sizes = layer_sizes(config, space)
    stages = tuple(fn(config, sizes, work, cluster) for fn in STAGE_MODELS)
    problems = tuple(_problem(s, cluster) for s in stages if not s.fits)
    smallest = None
    if problems and search:
        for n in CLUSTER_SIZES:
            if n <= cluster.count or n > len(sizes):
                continue
            if plan_resources(config, work, cluster.with_count(n), space=space, search=False).fits:
                smallest = cluster.with_count(n).name
                break
    return ResourcePlan(cluster=cluster, stages=stages, smallest=smallest, problems=problems)


def _problem(s: StageUse, cluster: Cluster) -> str:
    worst = max(s.ranks, key=lambda r: r.device_bytes / s.limit_bytes)
    if s.peak_device_bytes > s.limit_bytes:
        what = f"{worst.device_bytes / GIB:.1f} GiB of device memory on rank {worst.rank}"
        limit = f"{s.limit_bytes / GIB:.1f} GiB per rank"
    else:
        worst = max(s.ranks, key=lambda r: r.host_bytes)
        what = f"{worst.host_bytes / GIB:.1f} GiB of host memory on rank {worst.rank}"
        limit = f"{s.host_limit_bytes / GIB:.1f} GiB per rank"
    extra = f" ({s.note})" if s.note else ""
    return f"stage {s.stage} does not fit {cluster.name}: it needs {what}, more than the {limit}{extra}"


def _ranges(sizes: Sequence[LayerSizes], world: int) -> list[range]:
    from block_library.distributed import split_layers

    world = min(world, len(sizes))
    return split_layers(layer_costs(sizes), world)


def _host(cluster: Cluster, device_bytes: float, staged: float = 0.0) -> float:
    """Host memory of a rank whose device holds ``device_bytes``: the same memory on the CPU; on a GPU the
    process and ``staged``, the weights it reads into host memory (fp32) before moving them to the device."""
    return device_bytes if cluster.is_cpu else PROCESS_BYTES + staged


def _base(cluster: Cluster) -> float:
    from block_library.memory import CUDA_CONTEXT_BYTES

    return PROCESS_BYTES if cluster.is_cpu else CUDA_CONTEXT_BYTES


def _idle(cluster: Cluster, rank: int, layers: tuple[int, int] = (0, 0)) -> RankUse:
    b = _base(cluster)
    return RankUse(rank, layers, b, _host(cluster, b), 0.0, 0.0)


def _stage(name: str, how: str, ranks: list[RankUse], cluster: Cluster, note: str = "") -> StageUse:
    ranks += [_idle(cluster, r) for r in range(len(ranks), cluster.count)]
    return StageUse(name, how, tuple(ranks), cluster.memory_per_rank, cluster.host_per_rank, note)


def _rounds(items: list[tuple[str, int]], budget: float, bytes_per_param: int) -> list[int]:
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


def _layer_range(r: range) -> tuple[int, int]:
    return (r.start, r.stop)


# ------------------------------------------------------------------------------------------ stages


def library_use(config: Any, sizes: Sequence[LayerSizes], w: Work, cluster: Cluster) -> StageUse:
    db, out = cluster.dtype_bytes, []
    ranges = _ranges(sizes, cluster.count)
    calib_tokens, val_tokens = w.calib_sequences * w.seq_len, w.val_sequences * w.seq_len
    for rank, layers in enumerate(ranges):
        first = rank == 0
        fixed = build_fixed_bytes(config, sizes, layers, first=first, batch=w.bld_batch, seq_len=w.seq_len,
                                  dtype_bytes=db, device="cpu" if cluster.is_cpu else "gpu", ffn_refit=w.ffn_refit)
        rounds = _rounds(round_items(sizes, layers), cluster.memory_per_rank - fixed, INIT_BYTES_PER_PARAM)
        teacher = sum(sizes[l].parent_params for l in layers)
        variants = sum(sizes[l].trainable_params for l in layers)
        flops = 2 * teacher * calib_tokens + len(rounds) * 2 * teacher * val_tokens + 2 * variants * val_tokens
        flops += sum(sizes[l].lsq_subblocks for l in layers) * 2 * config.hidden_size ** 3  # the solves
        if w.ffn_refit:  # the Gram matrices (m^2 per token) and one (k, k) solve per pruned width
            pruned = [(l, sum(v.kind == "swiglu" for v in sizes[l].trainable)) for l in layers]
            flops += sum((2 * calib_tokens + 2 * n * sizes[l].ffn_width) * sizes[l].ffn_width ** 2 for l, n in pruned)
        disk = INIT_BYTES_PER_PARAM * variants + (INIT_BYTES_PER_PARAM * embedding_params(config) if first else 0)
        peak = fixed + INIT_BYTES_PER_PARAM * max(rounds)
        gram = gram_bytes(sizes, layers, ffn_refit=w.ffn_refit)  # host memory; in ``fixed`` on a CPU
        out.append(RankUse(rank, _layer_range(layers), peak, _host(cluster, peak, 4 * teacher + gram), disk,
                           flops / cluster.flops_per_rank + disk / DISK_BYTES_PER_S, len(rounds)))
    return _stage("library", "layers split over ranks; variants initialized in rounds", out, cluster)


def bld_use(config: Any, sizes: Sequence[LayerSizes], w: Work, cluster: Cluster) -> StageUse:
    db, out = cluster.dtype_bytes, []
    ranges = _ranges(sizes, cluster.count)
    parts = []
    for rank, layers in enumerate(ranges):
        fixed = bld_fixed_bytes(config, sizes, layers, first=rank == 0, batch=w.bld_batch, seq_len=w.seq_len,
                                dtype_bytes=db, device="cpu" if cluster.is_cpu else "gpu")
        parts.append((fixed, _rounds(round_items(sizes, layers), cluster.memory_per_rank - fixed,
                                     TRAIN_BYTES_PER_PARAM)))
    common = max(len(r) for _, r in parts)  # every rank replays the teacher pass in every round
    val_tokens = w.val_sequences * w.seq_len
    for rank, (layers, (fixed, rounds)) in enumerate(zip(ranges, parts)):
        teacher = sum(sizes[l].parent_params for l in layers)
        variants = sum(sizes[l].trainable_params for l in layers)
        flops = common * 2 * teacher * (w.bld_tokens + val_tokens) + 6 * variants * w.bld_tokens
        flops += 2 * variants * val_tokens
        checkpoint = 12 * max(rounds)  # weights and two moments of the round in flight
        disk = INIT_BYTES_PER_PARAM * variants + checkpoint
        steps = max(1, w.bld_tokens // (w.bld_batch * w.seq_len))
        peak = fixed + train_peak_bytes_per_param(steps) * max(rounds)  # rounds are sized at 16 B/param
        out.append(RankUse(rank, _layer_range(layers), peak, _host(cluster, peak, 4 * teacher), disk,
                           flops / cluster.flops_per_rank + disk / DISK_BYTES_PER_S, common))
    note = f"{common} round{'s' if common != 1 else ''} of variants per rank" if common > 1 else ""
    return _stage("bld", "layers split over ranks; variants trained in rounds", out, cluster, note)


def score_use(config: Any, sizes: Sequence[LayerSizes], w: Work, cluster: Cluster) -> StageUse:
    from block_library.distributed import split_layers
    from puzzle.scoring.memory import score_layer_costs, score_rank_bytes

    V, H = config.vocab_size, config.hidden_size
    world = min(cluster.count, len(sizes))
    ranges = split_layers(score_layer_costs(config), world)
    n, T = w.score_sequences, w.score_seq_len
    total_flops = 0.0
    for l, s in enumerate(sizes):  # a replacement at layer l runs its block, the later layers and the head
        later = sum(x.parent_params for x in sizes[l + 1:]) + V * H
        reps = 1 + len(s.trainable) + 2  # the parent block, every trained variant, the no-ops
        total_flops += reps * 2 * (s.parent_params + later) * n * T
    out = []
    for rank, layers in enumerate(ranges):
        peak = score_rank_bytes(config, sizes, layers, first=rank == 0, last=rank == world - 1, sequences=n,
                                seq_len=T, device=_device(cluster))
        staged = 4 * sum(sizes[l].parent_params for l in layers)
        out.append(RankUse(rank, _layer_range(layers), peak, _host(cluster, peak, staged), 0.0,
                           total_flops / world / cluster.flops_per_rank))
    return _stage("score", "layers split over ranks; replacements stream through the later layers (fp32)", out,
                  cluster)


def profile_use(config: Any, sizes: Sequence[LayerSizes], w: Work, cluster: Cluster) -> StageUse:
    seconds = 60.0 if w.cpu_calibrate else 1.0  # timing a few blocks on this CPU; else the analytic table
    b = _base(cluster) + (max(s.parent_params for s in sizes) * 4 if w.cpu_calibrate else 0)
    return _stage("profile", "rank 0: the cost table", [RankUse(0, (0, 0), b, _host(cluster, b), 0.0, seconds)],
                  cluster)


def solve_use(config: Any, sizes: Sequence[LayerSizes], w: Work, cluster: Cluster) -> StageUse:
    b = _base(cluster)
    if (w.finalists <= 1 and not w.refine_rounds) or cluster.count > 1:  # one process only: none on more ranks
        return _stage("solve", "rank 0: the MIP", [RankUse(0, (0, 0), b, _host(cluster, b) + 0.25 * GIB, 0.0, 5.0)],
                      cluster)
    _, C = _child(config, w)
    from puzzle.search.finalists import SEQUENCES

    P, tokens = _whole(config, sizes), SEQUENCES * w.seq_len
    # parent and one finalist whole (fp32), the parent's log-probs, one chunk of 2 sequences' logits in flight
    peak = b + (P + C) * 4 + tokens * config.vocab_size * 4 + 3 * 2 * w.seq_len * config.vocab_size * 4
    seconds = 5.0 * w.finalists + 2 * (P + w.finalists * C) * tokens / cluster.flops_per_rank
    how = f"one process: the MIP's {w.finalists} best different children measured"
    if w.refine_rounds:  # at most every variant half swapped into the child (it swaps the finalists' only), through
        # the later layers and the head
        V, H = config.vocab_size, config.hidden_size
        swaps = sum(len(s.trainable) + 2 for s in sizes)  # every trained variant and the no-ops
        flops = sum((len(s.trainable) + 2) * 2 * (s.parent_params + sum(x.parent_params for x in sizes[l + 1:]) + V * H)
                    for l, s in enumerate(sizes)) * tokens
        seconds += w.refine_rounds * (5.0 + flops / cluster.flops_per_rank + 2 * C * tokens / cluster.flops_per_rank)
        # the child's streams (input and mid of every layer) and four swaps' streams in flight
        peak += 2 * len(sizes) * tokens * H * 4 + 4 * tokens * H * 4
        how += f", then {w.refine_rounds} refinement round(s) of at most {swaps} swaps"
    return _stage("solve", how,
                  [RankUse(0, (0, len(sizes)), peak, _host(cluster, peak), 0.0, seconds)], cluster)


def _whole(config: Any, sizes: Sequence[LayerSizes]) -> int:
    """Parameters of the whole parent (and of the largest child it can have)."""
    head = 0 if config.tie_word_embeddings else embedding_params(config)
    return sum(s.parent_params for s in sizes) + embedding_params(config) + head + config.hidden_size


def _child(config: Any, w: Work) -> tuple[Any, int]:
    """The child to plan for and its parameters: the chosen one, or the parent (an upper bound)."""
    from puzzle.summary import totals

    child = w.child if w.child is not None else config
    return child, totals(child).params


def _device(cluster: Cluster) -> str:
    return "cpu" if cluster.is_cpu else "cuda"


def child_bld_use(config: Any, sizes: Sequence[LayerSizes], w: Work, cluster: Cluster) -> StageUse:
    from puzzle.distill.child_bld import ChildBLDConfig
    from puzzle.export.memory import assembly_peak_bytes

    child, C = _child(config, w)
    if w.child_bld_tokens == 0 or cluster.count > 1:  # one process only: the plan turns it off on more ranks
        assembly = assembly_peak_bytes(child)  # rank 0 writes the MIP's child tensor by tensor
        return _stage("child_bld", "rank 0: the child assembled tensor by tensor (child-aware BLD off)",
                      [RankUse(0, (0, 0), assembly if cluster.is_cpu else _base(cluster), assembly, C * 4,
                               2 * C * 4 / DISK_BYTES_PER_S)], cluster)
    from puzzle.summary import attention_params, ffn_params

    cfg = ChildBLDConfig(tokens=w.child_bld_tokens)
    P, decoder = _whole(config, sizes), C - embedding_params(config) * (1 if config.tie_word_embeddings else 2)
    # trained: the sub-blocks that differ from the parent's (before the MIP, every one: an upper bound)
    trained = sum(attention_params(c.attention, config) * (w.child is None or c.attention != p.attention)
                  + ffn_params(c.ffn, config) * (w.child is None or c.ffn != p.ffn)
                  for c, p in zip(child.blocks, config.blocks))
    H, I = config.hidden_size, max(s.ffn_width for s in sizes)
    B, T = cfg.step_batch, cfg.seq_len
    # one layer's activations and its backward (the stream, norms, q/k/v/o, the FFN's three projections), SDPA's scores
    activations = B * T * (16 * H + 4 * I) * 4 + B * config.num_attention_heads * T * T * 4
    peak = _base(cluster) + (P + C) * 4 + TRAIN_BYTES_PER_PARAM * trained + activations
    flops = cfg.steps * B * T * (2 * sum(s.parent_params for s in sizes) + 2 * decoder + 4 * trained)
    if w.child_refit:  # before the training: the streams, one chunk, one layer's G and C; forward passes only
        from puzzle.distill.child_refit import refit_bytes, refit_flops

        n = cfg.steps * B * T
        rc = ChildBLDConfig(tokens=1)
        refit = refit_bytes(n, H, I, 4, B * T, drift=rc.refit_drift > 0, select=rc.refit_select)
        peak = max(peak, _base(cluster) + (P + C) * 4 + refit)
        flops += n * (2 * decoder + 4 * sum(s.parent_params for s in sizes)) + len(sizes) * refit_flops(n, H, I, rc.refit_select)
    return _stage("child_bld", "one process: parent and child whole, the replaced sub-blocks trained"
                  + (", after the child-stream refit" if w.child_refit else ""),
                  [RankUse(0, (0, len(sizes)), peak, _host(cluster, peak), C * 4,
                           flops / cluster.flops_per_rank + 2 * C * 4 / DISK_BYTES_PER_S)], cluster)


def fuse_use(config: Any, sizes: Sequence[LayerSizes], w: Work, cluster: Cluster) -> StageUse:
    child, P = _child(config, w)
    if not w.fuse:
        b = _base(cluster)
        return _stage("fuse", "off (the child goes on as it is)", [RankUse(0, (0, 0), b, _host(cluster, b), 0.0, 0.0)],
                      cluster)
    tokens = w.fuse_sequences * w.seq_len
    flops = 2 * P * tokens * 6 + w.fuse_distill_steps * 6 * max(s.parent_params for s in sizes) * 2 * w.seq_len
    if cluster.count == 1:
        peak = _base(cluster) + 3 * P * 4 + 3 * tokens * config.vocab_size * 4  # parent, child, fused child (fp32)
        return _stage("fuse", "one process: parent, child and fused child whole",
                      [RankUse(0, (0, len(sizes)), peak, _host(cluster, peak), P * 4, flops / cluster.flops_per_rank)],
                      cluster)
    from block_library.distributed import split_layers
    from puzzle.evaluation.memory import layer_params
    from puzzle.fusion.memory import fuse_layer_costs, fuse_rank_bytes

    world = min(cluster.count, len(sizes))
    ranges, parent_ranges = split_layers(fuse_layer_costs(child), world), split_layers(layer_params(config), world)
    out = []
    for rank, layers in enumerate(ranges):
        peak = fuse_rank_bytes(child, layers, first=rank == 0, last=rank == world - 1,
                               calib_sequences=w.fuse_sequences, eval_sequences=w.fuse_sequences, seq_len=w.seq_len,
                               parent=config, parent_layers=parent_ranges[rank], distill=w.fuse_distill_steps > 0,
                               device=_device(cluster))
        staged = 4 * sum(sizes[l].parent_params for l in layers)
        out.append(RankUse(rank, _layer_range(layers), peak, _host(cluster, peak, staged), P * 4 / world,
                           flops / world / cluster.flops_per_rank))
    return _stage("fuse", "layers split over ranks: FFN runs fused where they live", out, cluster)


def gkd_memory_options(config: Any, w: Work, cluster: Cluster) -> tuple[bool, bool]:
    """``(activation_checkpointing, offload)`` for GKD: the first of none, checkpointing, checkpointing and
    the student's fp32 state in host RAM (FSDP2's CPU offload, GPUs only) that fits a rank."""
    sizes = layer_sizes(config)
    options = [(False, False), (True, False)] + ([(True, True)] if not cluster.is_cpu else [])
    for checkpointing, offload in options:
        if _gkd_bytes(config, sizes, w, cluster, checkpointing=checkpointing, offload=offload) <= cluster.memory_per_rank:
            return checkpointing, offload
    return options[-1]


def _gkd_bytes(config: Any, sizes: Sequence[LayerSizes], w: Work, cluster: Cluster, *, checkpointing: bool,
               offload: bool) -> float:
    from puzzle.distill.memory import gkd_rank_bytes

    P, world = _whole(config, sizes), cluster.count
    _, C = _child(config, w)
    unit = max([s.parent_params for s in sizes] + [embedding_params(config)])  # a layer, the embedding or the head
    local = max(1, w.gkd_batch // world)
    device = gkd_rank_bytes(C, P, largest_unit_params=unit, world=world, micro_batch=local, seq_len=w.seq_len,
                            hidden=config.hidden_size, layers=len(sizes), vocab=config.vocab_size,
                            checkpointing=checkpointing, dtype_bytes=cluster.dtype_bytes)
    if world == 1:
        device += C * 4  # the child as loaded, beside its fp32 student copy
    if offload:  # the fp32 student shards, their gradients and moments move to host RAM
        device -= TRAIN_BYTES_PER_PARAM * C / world
    return _base(cluster) + device


def gkd_use(config: Any, sizes: Sequence[LayerSizes], w: Work, cluster: Cluster) -> StageUse:
    (P, W), (_, C) = (_whole(config, sizes), cluster.count), _child(config, w)
    if w.gkd_steps == 0:
        b = _base(cluster)
        return _stage("gkd", "off (0 steps)", [RankUse(0, (0, 0), b, _host(cluster, b), 0.0, 0.0)], cluster)
    checkpointing, offload = gkd_memory_options(config, w, cluster)
    device = _gkd_bytes(config, sizes, w, cluster, checkpointing=checkpointing, offload=offload)
    how = f"FSDP2 over {W} ranks: student and teacher sharded" if W > 1 else "one process: student and teacher whole"
    host = _host(cluster, device)
    if checkpointing:
        how += ", activation checkpointing"
    if offload:
        host = PROCESS_BYTES + TRAIN_BYTES_PER_PARAM * C / W
        how += ", the student's fp32 state in host RAM (CPU offload)"
    if w.gkd_top_k and W == 1:  # the parent's targets, computed once, held in host RAM beside the rest
        from puzzle.distill.teacher_cache import bytes_per_token

        cache = w.gkd_steps * w.gkd_batch * w.seq_len * bytes_per_token(w.gkd_top_k, config.hidden_size)
        host += cache
        how += f", the parent's top-{w.gkd_top_k} targets cached ({cache / 2**30:.2f} GiB in host RAM)"
    flops = w.gkd_steps * w.gkd_batch * w.seq_len * ((8 if checkpointing else 6) * C + 2 * P) / W
    ranks = [RankUse(r, (0, len(sizes)), device, host, (C * 4 if r == 0 else 0.0), flops / cluster.flops_per_rank)
             for r in range(W)]
    return _stage("gkd", how, ranks, cluster)


def export_use(config: Any, sizes: Sequence[LayerSizes], w: Work, cluster: Cluster) -> StageUse:
    from puzzle.export.memory import export_peak_bytes

    child, P = _child(config, w)
    peak = export_peak_bytes(child)
    return _stage("export", "rank 0: the child copied tensor by tensor into DeciLM files",
                  [RankUse(0, (0, 0), peak if cluster.is_cpu else _base(cluster), peak, P * 4,
                           2 * P * 4 / DISK_BYTES_PER_S)], cluster)


def evaluate_use(config: Any, sizes: Sequence[LayerSizes], w: Work, cluster: Cluster) -> StageUse:
    from block_library.distributed import split_layers
    from puzzle.evaluation.memory import evaluate_rank_bytes, layer_params

    child, C = _child(config, w)
    P, world = _whole(config, sizes), min(cluster.count, len(sizes), child.num_hidden_layers)
    tokens = w.eval_sequences * w.seq_len
    seconds = 2 * (P + C) * tokens / cluster.flops_per_rank / world
    speed = (P + C) * 4  # parent and child whole on rank 0, timed
    if world == 1:
        peak = _base(cluster) + (P + C) * 4 + 5 * 256 * config.vocab_size * 4
        return _stage("evaluate", "one process: parent and child whole",
                      [RankUse(0, (0, len(sizes)), peak, _host(cluster, peak), 0.0,
                               seconds + (120.0 if w.measure_speed else 0.0))], cluster)
    ranges, child_ranges = split_layers(layer_params(config), world), split_layers(layer_params(child), world)
    out = []
    for rank, (layers, child_layers) in enumerate(zip(ranges, child_ranges)):
        peak = evaluate_rank_bytes(config, child, layers, child_layers, first=rank == 0, last=rank == world - 1, chunk=2,
                                   seq_len=w.seq_len, num_sequences=w.eval_sequences, dtype_bytes=4,
                                   device=_device(cluster))
        if rank == 0 and w.measure_speed:
            peak = max(peak, _base(cluster) + speed)
        staged = 4 * sum(sizes[l].parent_params for l in layers)
        out.append(RankUse(rank, _layer_range(layers), peak, _host(cluster, peak, staged), 0.0,
                           seconds + (120.0 if w.measure_speed and rank == 0 else 0.0)))
    how = "layers split over ranks, the parent's then the child's" + (", rank 0 times both whole"
                                                                       if w.measure_speed else "")
    return _stage("evaluate", how, out, cluster)


STAGE_MODELS = (library_use, bld_use, score_use, profile_use, solve_use, child_bld_use, fuse_use, gkd_use, export_use, evaluate_use)
"""One model per stage of :data:`puzzle.search.pipeline.STAGES`, in order."""
