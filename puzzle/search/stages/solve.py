"""``solve``: the MIP picks one variant per layer under the budget; its best few different children are
measured and the lowest KL goes on (``finalists``), optionally refined (``refine_rounds``).

    run/solve/solution.json        the MIP's solution (chosen candidates, totals, objective)
    run/solve/blocks.json          the child's block configs
    run/solve/finalists.csv        the finalists (and refinement steps): predicted and measured KL

Rank 0 alone (the finalists and the refinement run in one process).
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
from puzzle.search.resources import GIB, SEQ_LEN, Shapes, StageUse, base_bytes, host_bytes, one_rank, stage_use
from puzzle.search.setting import Section
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


class SolveStage(Stage):
    name, order = "solve", 50
    sections = (SolveSettings,)

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        from puzzle.search.finalists import finalist_skip

        s = SolveSettings.of(plan)
        measured = s.finalists > 1 or bool(s.refine_rounds)
        return {"score": upstream["score"], "profile": upstream["profile"], **budget_key(plan), "solver": s.solver,
                "constraints": list(s.constraints), "finalists": s.finalists,
                **({"bld": upstream["bld"], "data": list(s.data), "after": finalist_skip(s.eval_sequences)}
                   if measured else {}),
                **({"refine_rounds": s.refine_rounds} if s.refine_rounds else {})}

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from puzzle.errors import solver_errors
        from puzzle.schema import blocks_from_list, save_blocks
        from solvers import solve
        from solvers.io import write_json

        s, problem = SolveSettings.of(ctx.plan), solve_problem(ctx)
        measured: dict[str, Any] = {}
        if s.finalists == 1 and not s.refine_rounds:
            with solver_errors():
                solution = solve(problem, backend=s.solver)
        else:  # the MIP's best different children (its optimum first), measured; the lowest KL goes on
            solution, measured = self._finalists(ctx, problem, directory, s)
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
        from puzzle.search.finalists import (SEQUENCES, finalist_ids, finalist_skip, measure_finalists,
                                             parent_logprobs, score_fidelity)
        from solvers.diverse import diverse_solutions

        with solver_errors():
            solutions = diverse_solutions(problem, s.finalists, min_fraction=0.1, backend=s.solver)
        ids = finalist_ids(s.data, ctx.tokenizer, skip=finalist_skip(s.eval_sequences), sequences=SEQUENCES)
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

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        s, config, sizes = SolveSettings.of(plan), shapes.parent, shapes.layers
        b = base_bytes(cluster)
        if (s.finalists <= 1 and not s.refine_rounds) or cluster.count > 1:  # one process only: none on more ranks
            return stage_use(self.name, "rank 0: the MIP",
                             one_rank(cluster, device=b, seconds=5.0, host=host_bytes(cluster, b) + 0.25 * GIB),
                             cluster)
        from puzzle.search.finalists import SEQUENCES

        P, C, tokens = shapes.parent_params, shapes.child_params, SEQUENCES * SEQ_LEN
        # parent and one finalist whole (fp32), the parent's log-probs, one chunk of 2 sequences' logits in flight
        peak = b + (P + C) * 4 + tokens * config.vocab_size * 4 + 3 * 2 * SEQ_LEN * config.vocab_size * 4
        seconds = 5.0 * s.finalists + 2 * (P + s.finalists * C) * tokens / cluster.flops_per_rank
        how = f"one process: the MIP's {s.finalists} best different children measured"
        if s.refine_rounds:  # at most every variant half swapped into the child (it swaps the finalists' only),
            # through the later layers and the head
            V, H = config.vocab_size, config.hidden_size
            swaps = sum(len(x.trainable) + 2 for x in sizes)  # every trained variant and the no-ops
            flops = sum((len(x.trainable) + 2) * 2 * (x.parent_params + sum(y.parent_params for y in sizes[l + 1:])
                                                      + V * H) for l, x in enumerate(sizes)) * tokens
            seconds += s.refine_rounds * (5.0 + flops / cluster.flops_per_rank + 2 * C * tokens / cluster.flops_per_rank)
            # the child's streams (input and mid of every layer) and four swaps' streams in flight
            peak += 2 * len(sizes) * tokens * H * 4 + 4 * tokens * H * 4
            how += f", then {s.refine_rounds} refinement round(s) of at most {swaps} swaps"
        return stage_use(self.name, how, one_rank(cluster, device=peak, seconds=seconds, layers=(0, len(sizes))),
                         cluster)


STAGE = SolveStage()
