"""``solve``: the MIP picks one variant per layer under the budget; its best few different children are
measured and the lowest KL goes on (``finalists``), optionally refined (``refine_rounds``).

    run/solve/solution.json        the MIP's solution (chosen candidates, totals, objective)
    run/solve/blocks.json          the child's block configs
    run/solve/finalists.csv        the finalists (and refinement steps): predicted and measured KL

In one process the parent and each finalist are held whole and the finalists' KL is exact (and the refinement
may follow). On a cluster of several ranks (under torchrun, every rank runs this stage) rank 0 solves the MIP
and broadcasts its solutions, and the finalists are measured layer-sharded against the parent's top-k
log-probs, cached once in ``run/solve/parent-top<k>.safetensors`` (:mod:`puzzle.search.finalists_sharded`):
a coarsened KL, exact when k is the vocabulary. Rank 0 writes the files. The refinement is not sharded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.search.cluster import Cluster
from puzzle.search.context import StageContext
from puzzle.search.plan import Plan
from puzzle.search.resources import (GIB, RankUse, Shapes, StageUse, base_bytes, host_bytes, one_rank,
                                     stage_use)
from puzzle.search.setting import Section
from puzzle.search.timing import rank_clock
from puzzle.search.stages.base import Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolveSettings(Section):
    solver: str
    constraints: tuple[str, ...]
    finalists: int
    refine_rounds: int
    data: tuple[str, ...]
    eval_sequences: int
    """The finalists read held-out sequences after the evaluation's."""
    quality_context: int
    """The finalists' tokens per sequence."""


def finalist_plan(plan: Plan) -> tuple[int, int, int]:
    """``(skip, sequences, seq_len)`` of the finalists' held-out validation sequences: at the quality context, after
    every token the evaluation reads (:func:`puzzle.search.finalists.finalist_reads`)."""
    from puzzle.search.finalists import finalist_reads
    from puzzle.search.stages.evaluate import quality_contexts

    T = SolveSettings.of(plan).quality_context
    skip, sequences = finalist_reads(max(c * n for c, n in quality_contexts(plan).items()), T)
    return skip, sequences, T


def budget_key(plan: Plan) -> dict[str, Any]:
    """The MIP's limits, as the keys of the stages that solve under them (solve, baselines) hold them."""
    return {"speedup": plan.value("speedup"), "throughput": plan.value("throughput"), "memory": plan.value("memory"),
            "scenario": plan.budget_scenario.to_dict()}


def solve_problem(ctx: StageContext, *, constraints: bool = True) -> Any:
    """The run's MIP: scores (KL) and costs of every library variant the plan's engine loads, the plan's limits
    and constraints."""
    import pandas as pd

    from puzzle.engines import engine_rules
    from puzzle.engines.problem import engine_problem
    from puzzle.errors import solver_errors
    from solvers.io import problem_from_tables
    from solvers.parse import parse_constraint

    plan, s = ctx.plan, SolveSettings.of(ctx.plan)
    with solver_errors():
        problem = problem_from_tables(pd.read_csv(ctx.out("score", "scores")), pd.read_csv(ctx.out("profile", "costs")),
                                      score_column="kl", budget=plan.limits, scenario=plan.budget_scenario,
                                      constraints=[parse_constraint(c) for c in s.constraints] if constraints else [])
        return engine_problem(problem, engine_rules(plan.engine))


def _ranks(plan: Plan) -> int:
    return plan.cluster.count if plan.cluster is not None else 1


def coarsened_top_k(plan: Plan) -> int | None:
    """The k of the parent's top-k log-probs the finalists are measured against when the plan's cluster has
    several ranks (:func:`puzzle.search.finalists_sharded.finalist_top_k`); None when their KL is exact: one
    process, one finalist, or k the whole vocabulary.

    The key of the stage holds it then, so that a run resumed on one process and on several ranks do not share a
    result: the coarsened KL is a different measurement (a few percent below the exact one) and may rank two
    close finalists the other way. Runs on 2 or 8 ranks share it (the same k, the same figures to float
    rounding), and where k = V the measurement is the exact KL on any number of ranks, so the keys stay as in
    one process."""
    from puzzle.search.finalists_sharded import finalist_top_k

    if _ranks(plan) <= 1 or SolveSettings.of(plan).finalists <= 1:
        return None
    vocab = plan.parent_config.vocab_size
    k = finalist_top_k(vocab)
    return k if k < vocab else None


class SolveStage(Stage):
    name, order = "solve", 50
    sections = (SolveSettings,)
    sharded = True
    whole_parent = True
    """Under torchrun every rank runs it: with finalists they are measured layer-sharded, else rank 0 alone
    solves and the others return at once."""

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        s = SolveSettings.of(plan)
        measured = s.finalists > 1 or bool(s.refine_rounds)
        skip, sequences, T = finalist_plan(plan)
        return {"score": upstream["score"], "profile": upstream["profile"], **budget_key(plan), "solver": s.solver,
                "constraints": list(s.constraints), "finalists": s.finalists,
                **({"bld": upstream["bld"], "data": list(s.data), "after": skip} if measured else {}),
                **({"held_out": [sequences, T]} if measured and T != 256 else {}),  # older runs keep their keys
                **({"refine_rounds": s.refine_rounds} if s.refine_rounds else {}),
                **({"finalist_top_k": k} if (k := coarsened_top_k(plan)) is not None else {})}

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from puzzle.errors import solver_errors
        from solvers import solve

        s = SolveSettings.of(ctx.plan)
        several = ctx.world > 1 or _ranks(ctx.plan) > 1
        if several and s.refine_rounds:  # the resolver refuses it first; a safety net
            from puzzle.errors import ConfigError

            raise ConfigError("the refinement (refine_rounds) runs in one process with the parent and the child whole; "
                              "it is not sharded: use --refine-rounds 0 on a cluster of several ranks")
        if several and s.finalists > 1:  # every rank: the finalists measured layer-sharded
            solution, measured = self._sharded_finalists(ctx, directory, s)
            if not ctx.first:
                return {}  # the pipeline records rank 0's outputs
            return self._write(directory, solution, measured)
        if not ctx.first:
            return {}  # the MIP alone: rank 0's
        problem = solve_problem(ctx)
        measured: dict[str, Any] = {}
        if s.finalists == 1 and not s.refine_rounds:
            with solver_errors():
                solution = solve(problem, backend=s.solver)
        else:  # the MIP's best different children (its optimum first), measured; the lowest KL goes on
            solution, measured = self._finalists(ctx, problem, directory, s)
        return self._write(directory, solution, measured)

    def _write(self, directory: Path, solution: Any, measured: dict[str, Any]) -> dict[str, Any]:
        """solution.json and blocks.json of the child that goes on; the stage's outputs."""
        from puzzle.schema import blocks_from_list, save_blocks
        from solvers.io import write_json

        write_json(directory / "solution.json", solution.to_dict())
        save_blocks(blocks_from_list(solution.block_configs()), directory / "blocks.json")
        log.info("MIP: %s", solution.summary())
        return {"blocks": str(directory / "blocks.json"), "totals": solution.totals.to_dict(),
                "objective": solution.objective, **measured}

    def _finalists(self, ctx: StageContext, problem: Any, directory: Path, s: SolveSettings) -> tuple[Any, dict]:
        import pandas as pd

        from block_library import open_library
        from puzzle.errors import solver_errors
        from puzzle.io import atomic_write_text
        from puzzle.search.finalists import finalist_ids, measure_finalists, parent_logprobs, score_fidelity
        from solvers.diverse import diverse_solutions

        with solver_errors():
            solutions = diverse_solutions(problem, s.finalists, min_fraction=0.1, backend=s.solver)
        skip, sequences, T = finalist_plan(ctx.plan)
        ids = finalist_ids(s.data, ctx.tokenizer, skip=skip, sequences=sequences, seq_len=T)
        lib = open_library(ctx.out("bld", "library"))
        reference = parent_logprobs(ctx.parent, ids)  # once, for the finalists and the refinement
        finalists = measure_finalists(lib, ctx.parent, solutions, ids, reference=reference, progress=ctx.progress)
        table = pd.DataFrame([f.row() for f in finalists])
        spearman = score_fidelity(finalists)
        if s.refine_rounds:  # re-score around the best measured child, solve again; a better child goes on
            from puzzle.search.refine import REFINED_COLUMNS, refine

            with solver_errors():
                steps = refine(problem, lib, finalists, ids, reference, rounds=s.refine_rounds, backend=s.solver,
                               progress=ctx.progress)
            # the refinement's columns are there even when its first round found nothing new
            table = pd.DataFrame([f.row() for f in finalists] + [step.row() for step in steps],
                                 columns=[*table.columns, *REFINED_COLUMNS])
            finalists = sorted(finalists + [step.finalist for step in steps], key=lambda f: (f.kl, f.mip_rank))
        atomic_write_text(directory / "finalists.csv", table.to_csv(index=False))
        best = finalists[0]
        log.info("finalists: MIP rank %d of %d measures the lowest KL, %.4g", best.mip_rank, len(finalists), best.kl)
        return best.solution, {"finalists": len(finalists), "mip_rank": best.mip_rank, "kl": best.kl,
                               "spearman": spearman}

    def _sharded_finalists(self, ctx: StageContext, directory: Path, s: SolveSettings) -> tuple[Any, dict]:
        """Every rank: rank 0 solves the MIP and reads the held-out ids, both broadcast; the finalists measured
        layer-sharded (the same list on every rank); rank 0 writes finalists.csv."""
        import pandas as pd

        from block_library import open_library
        from block_library.distributed import Shard
        from block_library.session import parent_fingerprint
        from puzzle.errors import solver_errors
        from puzzle.io import atomic_write_text
        from puzzle.search.finalists import finalist_ids, score_fidelity
        from puzzle.search.finalists_sharded import (finalist_top_k, from_first, measure_finalists_sharded,
                                                     rank_shard, targets_name)
        from solvers.diverse import diverse_solutions

        shard = rank_shard(ctx.group if ctx.group is not None else Shard(rank=0, world=1))

        def mip() -> list[Any]:
            problem = solve_problem(ctx)
            with solver_errors():
                return diverse_solutions(problem, s.finalists, min_fraction=0.1, backend=s.solver)

        solutions = from_first(shard, mip)  # Solutions pickle whole (their Problem with them)
        skip, sequences, T = finalist_plan(ctx.plan)
        ids = from_first(shard, lambda: finalist_ids(s.data, ctx.tokenizer, skip=skip, sequences=sequences, seq_len=T))
        k = finalist_top_k(ctx.plan.parent_config.vocab_size)
        finalists = measure_finalists_sharded(open_library(ctx.out("bld", "library")), ctx.source, solutions, ids,
                                              shard=shard, path=directory / targets_name(k),
                                              parent_sha256=parent_fingerprint(ctx.source), top_k=k,
                                              progress=ctx.progress)
        if not ctx.first:
            return None, {}
        atomic_write_text(directory / "finalists.csv", pd.DataFrame([f.row() for f in finalists]).to_csv(index=False))
        best = finalists[0]
        log.info("finalists (layer-sharded over %d ranks, the parent's top %d): MIP rank %d of %d measures the "
                 "lowest KL, %.4g", shard.world, k, best.mip_rank, len(finalists), best.kl)
        return best.solution, {"finalists": len(finalists), "mip_rank": best.mip_rank, "kl": best.kl,
                               "spearman": score_fidelity(finalists), "finalist_top_k": k}

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        s, config, sizes = SolveSettings.of(plan), shapes.parent, shapes.layers
        b = base_bytes(cluster)
        if s.finalists <= 1 and (not s.refine_rounds or cluster.count > 1):  # (no refinement on several ranks)
            return stage_use(self.name, "rank 0: the MIP",
                             one_rank(cluster, device=b, seconds=5.0, host=host_bytes(cluster, b) + 0.25 * GIB),
                             cluster)
        if cluster.count > 1:
            return sharded_resources(self.name, s.finalists, cluster, shapes, finalist_plan(plan)[1:])
        _, N, T = finalist_plan(plan)
        P, C, tokens = shapes.parent_params, shapes.child_params, N * T
        # parent and one finalist whole (fp32), the parent's log-probs, one chunk of 2 sequences' logits in flight
        peak = b + (P + C) * 4 + tokens * config.vocab_size * 4 + 3 * 2 * T * config.vocab_size * 4
        seconds = finalists_seconds(s.finalists, cluster, shapes, 1, (N, T))
        how = f"one process: the MIP's {s.finalists} best different children measured on {N} x {T} tokens"
        if s.refine_rounds:  # at most every variant half swapped into the child (it swaps the finalists' only),
            # through the later layers and the head
            V, H = config.vocab_size, config.hidden_size
            swaps = sum(len(x.trainable) + 2 for x in sizes)  # every trained variant and the no-ops
            flops = sum((len(x.trainable) + 2) * 2 * (x.parent_params + sum(y.parent_params for y in sizes[l + 1:])
                                                      + V * H) for l, x in enumerate(sizes)) * tokens
            seconds += s.refine_rounds * (5.0 + (flops + 2 * C * tokens) / rank_clock(cluster, config).flops)
            # the child's streams (input and mid of every layer) and four swaps' streams in flight
            peak += 2 * len(sizes) * tokens * H * 4 + 4 * tokens * H * 4
            how += f", then {s.refine_rounds} refinement round(s) of at most {swaps} swaps"
        return stage_use(self.name, how, one_rank(cluster, device=peak, seconds=seconds, layers=(0, len(sizes))),
                         cluster)


def sharded_resources(name: str, finalists: int, cluster: Cluster, shapes: Shapes,
                      held_out: tuple[int, int] = (4, 256)) -> StageUse:
    """Every rank holds its layers of the parent, then of one finalist (fp32; the child planned as large as the
    parent until it is known); the last rank also the parent's top-k targets (host memory; twice while they are
    written and read back) and one chunk's log-probs (b x T x V floats, about three copies while the KL is
    taken). Rank 0 solves the MIP first. Time: 5 s a finalist (as in one process; the MIP, assembly) and the
    forwards of the parent and the finalists, split over the ranks."""
    from block_library.distributed import split_layers
    from puzzle.distill.teacher_cache import bytes_per_token
    from puzzle.evaluation.memory import chunk_activation_bytes, layer_params, model_part_params
    from puzzle.search.finalists_sharded import finalist_top_k

    config, child, b = shapes.parent, shapes.child_config, base_bytes(cluster)
    world = min(cluster.count, config.num_hidden_layers, child.num_hidden_layers)
    V, H, k, (N, T) = config.vocab_size, config.hidden_size, finalist_top_k(config.vocab_size), held_out
    targets = N * (T - 1) * (k * (4 + 8) + 4) + N * T * H * 2  # loaded: logp f32, index int64, rest; hidden bf16
    logits = 3 * 2 * (T - 1) * V * 4  # one chunk of 2 sequences' (b, T-1, V) float32 log-probs, ~3 copies
    seconds = finalists_seconds(finalists, cluster, shapes, world, held_out)
    out, child_ranges = [], split_layers(layer_params(child), world)
    for r, (pl, cl) in enumerate(zip(split_layers(layer_params(config), world), child_ranges)):
        first, last = r == 0, r == world - 1
        phases = []
        for cfg, layers, held in ((config, pl, 2 * targets), (child, cl, targets)):
            weights = model_part_params(cfg, layers, first=first, last=last) * 4
            work = chunk_activation_bytes(cfg, layers, chunk=2, seq_len=T, dtype_bytes=4)
            phases.append((weights, max(work, logits if last else 0.0), held if last else 0.0))
        staged = max(w for w, _, _ in phases)
        if cluster.is_cpu:
            peak = b + max(w + x + h for w, x, h in phases)
            host = peak
        else:  # the targets stay in host memory; a chunk of them is moved to the device
            peak = b + max(w + x for w, x, _ in phases)
            host = host_bytes(cluster, peak, staged) + max(h for _, _, h in phases)
        if first:  # the MIP, before any layer is read
            host = max(host, host_bytes(cluster, b) + 0.25 * GIB)
        disk = N * T * bytes_per_token(k, H) if last else 0.0
        out.append(RankUse(r, (pl.start, pl.stop), peak, host, disk, seconds))  # the ranks wait for each other
    how = (f"layer-sharded over {world} ranks: the parent's top-{k} log-probs cached once, each of the {finalists} "
           f"finalists measured against them on {N} x {T} tokens")
    return stage_use(name, how, out, cluster)


MIP_SECONDS = 0.5
"""One solve of the MIP for a finalist (the 0.1-1 s of CBC or CP-SAT on a library of 30-126 layers)."""
SOLVE_FIXED_SECONDS = 2.0
"""Reading the costs, the scores and the library's index, and tokenizing the finalists' text."""


def finalists_seconds(finalists: int, cluster: Cluster, shapes: Shapes, world: int,
                      held_out: tuple[int, int] = (4, 256)) -> float:
    """The MIP once per finalist, the parent's log-probabilities (once) and every finalist assembled from the
    library's files and measured, chunks of 2 sequences passed rank to rank (layer-sharded: each rank its layers)."""
    from block_library.distributed import split_layers
    from puzzle.evaluation.memory import layer_params
    from puzzle.search.timing import ASSEMBLY_BYTES_PER_S, VOCAB_METRIC, VOCAB_TOPK, batches, pipeline

    (N, T), clock = held_out, rank_clock(cluster, shapes.parent)
    b, m = batches(N, 2)

    def passes(config: Any, vocab: float) -> float:
        ranges = split_layers(layer_params(config), max(1, min(world, len(config.blocks))))
        work = [clock.blocks([config.blocks[l] for l in r], b, T) for r in ranges]
        return pipeline(work, m) + m * clock.head(b * (T - 1), vocab)

    child = passes(shapes.child_config, VOCAB_METRIC) + 4 * shapes.child_params / world / ASSEMBLY_BYTES_PER_S
    return SOLVE_FIXED_SECONDS + passes(shapes.parent, VOCAB_TOPK) + finalists * (MIP_SECONDS + child)


STAGE = SolveStage()
