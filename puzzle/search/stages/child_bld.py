"""``child_bld``: child-aware BLD retrains the MIP's child's replaced sub-blocks on the child's own activations
(:mod:`puzzle.distill.child_bld`), after a least-squares refit of its pruned FFNs (``child_refit``).

    run/child_bld/child/           the child (runtime checkpoint)
    run/child_bld/losses.csv       each trained sub-block's NMSE per step

Every rank (one process: all the layers) holds its layers of both and the streams pass rank to rank
(:mod:`puzzle.distill.child_bld_sharded`: the same weights); a rank whose layers do not fit its memory
(``cluster.memory_per_rank``) trains them in rounds over windows of steps, and refits them one layer at a time (on
a GPU too small for a layer's Gram, with the Gram and its elimination in host RAM).
Off (``child_bld_tokens`` 0), rank 0 assembles the MIP's child tensor by tensor. The baselines get the same
training in one process with the models whole (:meth:`train`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.search.cluster import DISK_BYTES_PER_S, Cluster
from puzzle.search.context import StageContext
from puzzle.search.plan import Plan
from puzzle.search.resources import SEQ_LEN as LIBRARY_SEQ_LEN
from puzzle.search.resources import Shapes, StageUse, base_bytes, one_rank, stage_use
from puzzle.search.setting import Section
from puzzle.search.stages.base import Stage

log = logging.getLogger(__name__)

STREAM_BYTES_PER_S = {"cpu": 1.0e9, "gpu": 2.0e10}
"""Rate of one rank's stream to the next (gloo over local sockets on the CPU; NCCL between GPUs, as across nodes)."""


@dataclass(frozen=True)
class ChildBLDSettings(Section):
    child_bld_tokens: int
    child_refit: bool
    seed: int
    data: tuple[str, ...]
    bld_eval_sequences: int
    bld_tokens: int
    """Child-aware BLD reads the train split's sequences after the library's calibration and BLD ones."""
    quality_context: int
    """Tokens per training sequence."""


STEP_TOKENS = 1024
"""Tokens of a child-aware BLD step: 4 sequences of 256 tokens, 1 of 1024 (at least one sequence)."""


def refit_key(plan: Plan) -> dict[str, Any]:
    """The child-stream refit's part of a key: its settings when it is on, nothing when off (runs from before the
    setting keep their keys)."""
    from puzzle.distill.child_bld import ChildBLDConfig

    if not ChildBLDSettings.of(plan).child_refit:
        return {}
    cfg = ChildBLDConfig(tokens=1)
    return {"child_refit": {"drift": cfg.refit_drift, "ridge": cfg.refit_ridge, "select": cfg.refit_select}}


def training_key(plan: Plan) -> dict[str, Any]:
    """What a model trained by this stage depends on besides its inputs (the baselines' keys hold it too)."""
    s = ChildBLDSettings.of(plan)
    return {"child_bld": [s.child_bld_tokens, s.seed], **context_key(s), **refit_key(plan)}


def context_key(s: ChildBLDSettings) -> dict[str, Any]:
    """The training sequences' length in a key, when it is not the 256 tokens of the runs from before the setting."""
    return {} if s.quality_context == LIBRARY_SEQ_LEN else {"seq_len": s.quality_context}


CHECKPOINTS = 100
"""About how many checkpoints a run writes (every 1% of its steps, at least every ``checkpoint_every`` = 4): each
holds the trained sub-blocks' weights and AdamW moments, 12 bytes per parameter, so one every 4 steps of a
production run (28 k steps for an 8B parent) would take a hundred times the training's own time to write."""


def training_config(s: ChildBLDSettings) -> Any:
    """The ``ChildBLDConfig`` of the stage's settings (the search's child and the baselines)."""
    from puzzle.distill.child_bld import ChildBLDConfig

    T = s.quality_context
    cfg = ChildBLDConfig(tokens=s.child_bld_tokens, seed=s.seed, refit=bool(s.child_refit), seq_len=T,
                         batch=max(1, STEP_TOKENS // T))
    every = max(1, cfg.steps // (CHECKPOINTS * cfg.checkpoint_every)) * cfg.checkpoint_every
    return dataclasses.replace(cfg, checkpoint_every=every)


def training_ids(plan: Plan, tokenizer: Any, cfg: Any) -> Any:
    """Child-aware BLD's training ids for ``cfg`` (a ``ChildBLDConfig``): the train split's sequences after the
    library's calibration and BLD ones (sequences of 256 tokens: as many of ``cfg.seq_len`` as cover them)."""
    from puzzle.distill.child_bld import training_ids as ids_after

    s = ChildBLDSettings.of(plan)
    library = s.bld_eval_sequences * LIBRARY_SEQ_LEN + s.bld_tokens
    return ids_after(s.data, tokenizer, cfg, skip=-(-library // cfg.seq_len))


class ChildBLDStage(Stage):
    name, order = "child_bld", 60
    sections = (ChildBLDSettings,)
    sharded = True

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        s = ChildBLDSettings.of(plan)
        return {"solve": upstream["solve"], "bld": upstream["bld"], "tokens": s.child_bld_tokens, "seed": s.seed,
                "data": list(s.data), "after": [s.bld_eval_sequences, s.bld_tokens], **context_key(s),
                **refit_key(plan)}

    def train(self, ctx: StageContext, model: Any, directory: Path) -> Any:
        """Child-aware BLD of ``model`` as the plan says, checkpoints and ``losses.csv`` in ``directory`` (a
        ``ChildBLDResult``). The search's child and its baselines get the same."""
        from puzzle.distill.child_bld import ChildBLDConfig, ChildBLDResult, replaced_subblocks, train_child_blocks

        if not replaced_subblocks(model, ctx.parent):  # the parent's own sub-blocks and no-ops: nothing to train
            return ChildBLDResult(model=model, trained=[], steps=0, tokens=0, seconds=0.0)
        s = ChildBLDSettings.of(ctx.plan)
        cfg = training_config(s)
        ids = training_ids(ctx.plan, ctx.tokenizer, cfg)
        return train_child_blocks(model, ctx.parent, ids, cfg, directory=directory, progress=ctx.progress)

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from block_library import open_library
        from puzzle.schema import load_blocks

        lib = open_library(ctx.out("bld", "library"))
        blocks = load_blocks(ctx.out("solve", "blocks"))
        if ChildBLDSettings.of(ctx.plan).child_bld_tokens == 0:  # off: the MIP's child as it is, tensor by tensor
            if ctx.first:
                lib.assemble_to(blocks, directory / "child", overwrite=True)
            return {"model": str(directory / "child"), "tokens": 0}
        result = self.train_sharded(ctx, lib, blocks, directory)  # every rank its layers; rank 0 writes the child
        log.info("child-aware BLD: %d sub-blocks, NMSE %.4g -> %.4g, %.0f tokens/s", len(result.trained),
                 result.summary()["first_nmse"], result.summary()["last_nmse"], result.tokens_per_s)
        return {"model": str(directory / "child"), "losses": str(directory / "losses.csv"), **result.summary()}

    def train_sharded(self, ctx: StageContext, lib: Any, blocks: Any, directory: Path) -> Any:
        """The search's child trained with its layers split over the ranks (one process: all of them), each
        rank's in rounds that fit its memory, written to ``directory / "child"`` (every rank calls it; a
        ``ChildBLDResult`` whose ``model`` is that directory)."""
        from puzzle.distill.child_bld_sharded import train_child_sharded
        from puzzle.distill.sharding import on_rank0

        s = ChildBLDSettings.of(ctx.plan)
        cfg = training_config(s)
        ids = on_rank0(lambda: training_ids(ctx.plan, ctx.tokenizer, cfg), ctx.group)  # read once, sent to all
        return train_child_sharded((lib, blocks), ctx.source, ids, cfg, directory / "child", directory=directory,
                                   progress=ctx.progress, budget=ctx.plan.cluster.memory_per_rank,
                                   window_bytes=_window_bound(ctx.plan.cluster))

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        from puzzle.export.memory import assembly_peak_bytes

        s, child, C = ChildBLDSettings.of(plan), shapes.child_config, shapes.child_params
        nothing = (shapes.child is not None and len(child.blocks) == len(shapes.parent.blocks)
                   and not _parts(shapes))  # the MIP's child keeps the parent's own sub-blocks and no-ops only
        if s.child_bld_tokens == 0 or nothing:
            assembly = assembly_peak_bytes(child)  # rank 0 writes the MIP's child tensor by tensor
            why = "child-aware BLD off" if s.child_bld_tokens == 0 else "it replaces no sub-block: nothing to train"
            return stage_use(self.name, f"rank 0: the child assembled tensor by tensor ({why})",
                             one_rank(cluster, device=assembly if cluster.is_cpu else base_bytes(cluster),
                                      host=assembly, disk=C * 4, seconds=2 * C * 4 / DISK_BYTES_PER_S), cluster)
        return _layer_sharded(s, training_config(s), cluster, shapes)


def _layer_sharded(s: ChildBLDSettings, cfg: Any, cluster: Cluster, shapes: Shapes) -> StageUse:
    """Each rank (one process: rank 0 alone): its layers of parent and child in rounds that fit its memory
    (:func:`puzzle.distill.child_bld_memory.plan_rank`: a round's weights, the AdamW state of its trained
    sub-blocks, one layer's activations; rank 0 the embedding), the refit before (whole, or one layer at a time:
    its streams of at most ``REFIT_MAX_TOKENS`` tokens and one layer's G and C). The refit runs rank after rank
    (each waits for the ones before it), the training steps pipelined (no rank faster than the ones before it);
    with rounds, every window reloads each round's parent layers, child layers and checkpoint, and writes the
    checkpoint again. The child is the library's, so rank 0's embedding serves both models' streams; a GPU rank
    whose refit does not fit keeps the Gram and its elimination in host RAM (counted in its host bytes and, at the
    CPU's rate, in its seconds), a GPU rank 0 whose first layer and embedding do not fit embeds in host RAM."""
    from puzzle.distill.child_bld_memory import FP32, layer_shape, plan_rank, resume_period, window_steps
    from puzzle.distill.teacher_sharded import layer_ranges
    from puzzle.search.resources import RankUse, host_bytes, layer_range

    config, child = shapes.parent, shapes.child_config
    if len(child.blocks) != len(config.blocks):  # a fused child (the plan of a later stage): this stage ran on the
        shapes = dataclasses.replace(shapes, child=None)  # MIP's, as long as the parent: plan its upper bound
        child = shapes.child_config
    world = min(cluster.count, config.num_hidden_layers)
    parts = _parts(shapes)
    shape, need = layer_shape(config, child, parts), max((l for l, _ in parts), default=-1)
    from puzzle.search.timing import rank_clock

    B, T, clock = cfg.step_batch, cfg.seq_len, rank_clock(cluster, config)
    stream = B * T * config.hidden_size * 4  # one step's stream (float32)
    window = window_steps(cfg.steps, cfg.checkpoint_every, stream, _window_bound(cluster))
    refit = _refit_shape(s, cfg, child, parts)
    ranges = layer_ranges(child, world)
    runs = [range(r.start, min(r.stop, need + 1)) for r in ranges]
    plans = [plan_rank(shape, run, batch=B, seq_len=T, window=window, first=rank == 0, cpu=cluster.is_cpu,
                       budget=cluster.memory_per_rank, refit=refit) for rank, run in enumerate(runs)]
    windowed = any(len(p.rounds) > 1 for p in plans)
    period = resume_period(window, world) if windowed else cfg.checkpoint_every
    link = STREAM_BYTES_PER_S["cpu" if cluster.is_cpu else "gpu"]
    host_fps = _host_flops() if any(p.refit_host for p in plans) else 0.0
    out, refit_done, upstream = [], 0.0, 0.0
    for rank, (layers, run, rp) in enumerate(zip(ranges, runs, plans)):
        teacher, decoder = sum(shape.parent[l] for l in run), sum(shape.child[l] for l in run)
        trained = sum(shape.trained[l] for l in run)
        edges = (rank > 0) + (rank < world - 1 and run.stop <= need)  # streams received and sent
        train = (cfg.steps * _step_seconds(clock, config, child, run, [p for p in parts if p[0] in run], B, T)
                 + cfg.steps * stream * edges / link + _io_seconds(shape, rp.rounds, cfg, window, period, rank == 0))
        upstream = max(upstream, train)  # a rank steps no faster than the ones before it
        if refit is not None and run and run.start <= refit.last:
            refit_done += _refit_seconds(shape, run, refit, clock=clock, config=config, child=child,
                                         refits=[l for l, sub in parts if sub == "ffn" and l in run],
                                         whole=rp.refit_whole, link=link if rank > 0 else 0.0,
                                         host_fps=host_fps if rp.refit_host else 0.0)
        # on disk: its tensors and checkpoints (weights and AdamW moments: two roots, a third with rounds), the
        # refit's layers; rank 0 reads and writes the child
        roots, written = 3 if len(rp.rounds) > 1 else 2, shapes.child_params * 4 * (rank == 0)
        disk = (4 + roots * 12) * trained + (0 if rp.refit_whole else 4 * decoder) + written
        seconds = refit_done + upstream + (4 * trained + 2 * written) / DISK_BYTES_PER_S
        staged = max((shape.weights(r) for r in rp.rounds), default=0.0) + rp.window_bytes  # host: read, streams
        staged += FP32 * shape.embedding if rp.embed_host else 0.0  # rank 0's lookup
        if rp.refit_host:  # before the training: one layer read, the Gram and elimination
            staged = max(staged, max(shape.weights([l]) for l in run) + rp.refit_host_bytes)
        out.append(RankUse(rank, layer_range(layers), rp.peak, host_bytes(cluster, rp.peak, staged), disk, seconds,
                           rounds=max(1, len(rp.rounds))))
    how = ("one process: the replaced sub-blocks trained" if world == 1 else
           f"layer-sharded over {world} ranks: each trains the replaced sub-blocks of its layers, the streams passed "
           "rank to rank") + f", {cfg.steps} steps of {B} x {T} tokens"
    if windowed:
        how += f", in {max(u.rounds for u in out)} rounds of its layers, windows of {min(window, cfg.steps)} steps"
    if refit is not None:
        how += ", after the child-stream refit" + (" (rank after rank)" if world > 1 else "")
        if any(p.refit_host for p in plans):
            how += "; the refit's Gram and elimination in host RAM"
    if plans and plans[0].embed_host:
        how += "; rank 0 embeds in host RAM"
    return stage_use("child_bld", how, out, cluster)


def _refit_shape(s: ChildBLDSettings, cfg: Any, child: Any, parts: list[tuple[int, str]]) -> Any:
    """The refit's :class:`~puzzle.distill.child_bld_memory.RefitShape` (None when off or nothing to refit): at most
    ``REFIT_MAX_TOKENS`` of the training tokens, up to the last replaced swiglu FFN."""
    from puzzle.distill.child_bld_memory import RefitShape
    from puzzle.distill.child_refit import REFIT_MAX_TOKENS

    swiglu = [l for l, sub in parts if sub == "ffn" and child.blocks[l].ffn.kind == "swiglu"]
    if not s.child_refit or not swiglu:
        return None
    rc, T = type(cfg)(tokens=1), cfg.seq_len
    return RefitShape(tokens=min(cfg.steps * cfg.step_batch, max(1, REFIT_MAX_TOKENS // T)) * T, last=max(swiglu),
                      drift=rc.refit_drift > 0, select=rc.refit_select, chunk_tokens=cfg.batch * T,
                      shared_embedding=True,  # the library's child: its embedding is the parent's
                      layers=tuple(swiglu), seq_len=T)


def _step_seconds(clock: Any, config: Any, child: Any, run: range, parts: list[tuple[int, str]], B: int,
                  T: int) -> float:
    """One training step of a rank: the parent's layers (the targets) and the child's forward, the replaced
    sub-blocks' backward (twice their forward), AdamW over them."""
    from puzzle.search.timing import KAPPA

    trained = [getattr(child.blocks[l], sub) for l, sub in parts]
    return (clock.blocks([config.blocks[l] for l in run], B, T) + clock.blocks([child.blocks[l] for l in run], B, T)
            + (KAPPA - 1) * sum(clock.sub(sub, c, B, T) for (_, sub), c in zip(parts, trained))
            + clock.optimizer(sum(_params(sub, c, child) for (_, sub), c in zip(parts, trained))))


def _params(sub: str, cfg: Any, config: Any) -> int:
    from puzzle.summary import attention_params, ffn_params

    return attention_params(cfg, config) if sub == "attention" else ffn_params(cfg, config)


def _refit_seconds(shape: Any, run: range, refit: Any, *, clock: Any, config: Any, child: Any, refits: list[int],
                   whole: bool, link: float, host_fps: float = 0.0) -> float:
    """A rank's refit: the forward passes of its layers up to the last refit one (the parent's twice with the drift:
    its own stream and the targets), in chunks; each refit layer's G and C and its channel selection
    (:func:`obs_seconds`; ``host_fps``: on the host's CPU at that rate, its float64 sums copied there a chunk at a
    time); the streams received (``link``: 0 on rank 0); one layer at a time, each read from disk."""
    from puzzle.distill.child_refit import refit_flops, refit_solve_flops

    walked = [l for l in run if l <= refit.last]
    refits = [l for l in refits if l <= refit.last and child.blocks[l].ffn.kind == "swiglu"]
    n, H = refit.tokens, shape.hidden
    T = refit.seq_len
    b, chunks = max(1, refit.chunk_tokens // T), -(-n // refit.chunk_tokens)
    passes = chunks * (clock.blocks([child.blocks[l] for l in walked], b, T)
                       + (2 if refit.drift else 1) * clock.blocks([config.blocks[l] for l in walked], b, T))
    sums = sum(refit_flops(n, H, shape.width[l], False) - refit_solve_flops(H, shape.width[l], False) for l in refits)
    solves = [(shape.width[l], _kept(child, l, shape.width[l])) for l in refits]
    host = 0.0
    if host_fps:
        elimination = sum(refit_solve_flops(H, D, refit.select) for D, _ in solves)
        copied = sum(chunks * (D ** 2 + D * H) * 4 for D, _ in solves)  # float32 sums
        host = elimination / host_fps + copied / HOST_COPY_BYTES_PER_S
    else:
        host = sum(obs_seconds(clock, D, k, H, select=refit.select) for D, k in solves)
    received = n * H * 4 * (2 if refit.drift else 1) / link if link else 0.0
    child_params, parent_params = sum(shape.child[l] for l in walked), sum(shape.parent[l] for l in walked)
    return passes + clock.gemm(sums) + host + received + (
        0.0 if whole else 4 * (child_params + parent_params) / DISK_BYTES_PER_S)


LAPACK_SLOWDOWN = 6.0
"""The Cholesky factor and inverse of a (D, D) float64 Gram against a float64 GEMM of the same FLOPs (measured:
3.3 s for D = 3072 on one thread of this machine's CPU)."""
ELIMINATION_BYTES = (24.0, 48.0)
"""Memory traffic of one elimination step per element of the (D, D) inverse (its in-place rank-m update, the zeroed
row and column) and of the (D, H) fit (its update, the costs' squares and sums)."""
ELIMINATION_STEP_SECONDS = 0.02
"""The fixed part of an elimination step: two small solves, the top-m of the costs, indexing (eager, float64)."""


def obs_seconds(clock: Any, D: int, k: int, H: int, *, select: bool) -> float:
    """The channel selection of one refit layer keeping ``k`` of ``D`` channels
    (:func:`puzzle.distill.channel_select.obs_select`: the inverse, 256 elimination steps, the final solve); without
    ``select`` the solve alone. Measured on one thread: 130 s for the 1.24 B proof's D = 8192 (k = 4096, H = 2048),
    7 s for SmolLM2's D = 1536."""
    solve = clock.gemm(2.0 * k * k * H + 2.0 / 3.0 * k ** 3, fp64=True) * LAPACK_SLOWDOWN
    if not select:
        return solve
    steps = min(256, max(0, D - k))
    step = clock.memory(ELIMINATION_BYTES[0] * D * D + ELIMINATION_BYTES[1] * D * H) + ELIMINATION_STEP_SECONDS
    return clock.gemm(float(D) ** 3, fp64=True) * LAPACK_SLOWDOWN + steps * step + solve


def _kept(child: Any, l: int, D: int) -> int:
    """The channels the refit keeps in layer ``l``: the child's width, half the parent's when the child is not known
    yet (the parent stands in for it)."""
    k = child.blocks[l].ffn.intermediate_size
    return k if k < D else D // 2


HOST_COPY_BYTES_PER_S = 2.0e10
"""Rate of a GPU's copies to host RAM (PCIe 5, about half its peak)."""


def _host_flops() -> float:
    """Float64 FLOP/s of the refit's elimination on a GPU node's host, for one rank (the plan is usually made on
    another machine than the cluster's: a DGX H100's CPUs, :data:`~puzzle.search.cluster.HOST_FP64_FLOPS_PER_GPU`)."""
    from puzzle.search.cluster import HOST_FP64_FLOPS_PER_GPU

    return HOST_FP64_FLOPS_PER_GPU


def _io_seconds(shape: Any, rounds: Sequence[range], cfg: Any, window: int, period: int, first: bool) -> float:
    """Disk time of a rank's training: with rounds, every window reads each round's parent and child layers (rank
    0's first round the embedding too) and its checkpoint, and writes the checkpoint (12 bytes per trained
    parameter: the weight and two AdamW moments), after one read of the child for the run's fingerprint; one round
    reads its layers once and writes a checkpoint every ``period`` steps."""
    ckpt = lambda r: 12 * sum(shape.trained[l] for l in r)  # noqa: E731
    if len(rounds) <= 1:
        held = sum(shape.weights(r) for r in rounds)
        return (held + -(-cfg.steps // period) * sum(ckpt(r) for r in rounds)) / DISK_BYTES_PER_S
    windows = -(-cfg.steps // window)
    child = sum(4 * shape.child[l] for r in rounds for l in r)
    per_window = sum(shape.weights(r) + 2 * ckpt(r) for r in rounds) + (4 * shape.embedding if first else 0)
    return (child + windows * per_window) / DISK_BYTES_PER_S


WINDOW_HOST_FRACTION = 0.25
"""Share of a GPU rank's host memory that a window's streams may fill (a DGX H100: 62 GB of its 250 GB a GPU)."""


def _window_bound(cluster: Cluster) -> float:
    """Bytes of the streams a window keeps between two rounds, in host memory: on the CPU (the ranks' memory) at
    most :data:`~puzzle.distill.child_bld_memory.WINDOW_BYTES` and an eighth of a rank's; on GPUs a quarter of a
    rank's host memory, so that the per-window reloads stay below the training's own time for large parents
    (a 70B parent's rank reads and writes about 270 GB a window: with 1 GiB windows of 32 steps, 40 times the
    steps' compute; with 58 GiB ones of 1,860 steps, about three quarters of it)."""
    from puzzle.distill.child_bld_memory import WINDOW_BYTES

    if cluster.is_cpu:
        return min(WINDOW_BYTES, cluster.memory_per_rank / 8)
    return WINDOW_HOST_FRACTION * cluster.host_per_rank


def _parts(shapes: Shapes) -> list[tuple[int, str]]:
    """The sub-blocks the training changes: those of the chosen child that differ from the parent's (before the
    MIP, every one that is not a no-op: an upper bound)."""
    from types import SimpleNamespace

    from puzzle.distill.subblocks import replaced_subblocks

    child, parent = shapes.child_config, shapes.parent
    if shapes.child is None:
        return [(l, sub) for l, b in enumerate(child.blocks) for sub in ("attention", "ffn")
                if getattr(b, sub).kind != "no_op"]
    return replaced_subblocks(SimpleNamespace(config=child), SimpleNamespace(config=parent))


STAGE = ChildBLDStage()
