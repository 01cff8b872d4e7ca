"""Refinement: the MIP re-solved on scores measured around the best child so far.

The finalists (:mod:`puzzle.search.finalists`) are the MIP's best children under replace-1 scores, a
first-order estimate around the parent. Refinement re-measures the finalists' blocks around the best
measured child instead (:mod:`puzzle.scoring.context`) and solves the same problem (same budget, same
constraints) over those blocks on those scores: the best recombination of the finalists under a
first-order estimate around a point much nearer to them than the parent. The new child is assembled
and measured on the finalists' tokens; when it measures lower, it becomes the point of the next round:

    best = finalists[0]
    for r in range(rounds):
        only = {l: the blocks any finalist so far has at layer l}
        scores = context_scores(library, best.blocks, ids, reference, only=only)   # a few swaps a layer
        s = solve(scores.problem(problem))                     # the same budget, over those blocks
        if s was measured already: break                       # a fixed point
        measure s; best = min(best, s)

A round costs one swap (the later layers and the head) per half that differs from the best child's,
plus one child forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from puzzle.errors import ConfigError


REFINED_COLUMNS = ("round", "context_predicted_kl", "base_kl", "seconds")
"""The columns a refined child adds to a finalist's row."""


@dataclass(frozen=True)
class Refined:
    """One round: the child it proposed (a solution of the original problem), its predictions and its KL."""

    round: int
    finalist: Any  # puzzle.search.finalists.Finalist; mip_rank: after the diverse solutions'
    context_predicted_kl: float
    """predicted(S | best so far): the context scores' estimate of its KL."""
    base_kl: float
    """The round's base child's KL on the context tokens."""
    seconds: float
    """Context scoring, solve and measurement."""

    def row(self) -> dict[str, Any]:
        return {**self.finalist.row(), "round": self.round, "context_predicted_kl": self.context_predicted_kl,
                "base_kl": self.base_kl, "seconds": round(self.seconds, 1)}


def on_problem(problem: Any, solution: Any) -> Any:
    """``solution`` (of a problem with the same candidates in the same order) as a solution of ``problem``:
    verified again, its objective the original score column's sum."""
    from solvers.solution import Solution
    from solvers.verify import verify

    totals, checks = verify(problem, list(solution.chosen))
    return Solution(problem=problem, chosen=tuple(solution.chosen), totals=totals, checks=tuple(checks),
                    backend=solution.backend, status=solution.status, gap=solution.gap, seconds=solution.seconds)


def refine(problem: Any, library: Any, finalists: Sequence[Any], ids: torch.Tensor, reference: Sequence[torch.Tensor],
           *, rounds: int, backend: str, progress: bool = False) -> list[Refined]:
    """Up to ``rounds`` refinement rounds from measured ``finalists`` (best first; see the module docstring).

    ``ids`` (N, T) and ``reference`` (:func:`puzzle.search.finalists.parent_logprobs` on them) are the
    finalists' tokens. The refined children get ``mip_rank`` after the finalists'. Stops early at a fixed
    point (the re-solve returns the best child, or a child measured already)."""
    import time

    from puzzle.schema import blocks_from_list
    from puzzle.scoring.context import context_scores
    from puzzle.search.finalists import Finalist, measure
    from solvers import solve

    if rounds < 0:
        raise ConfigError(f"refinement rounds must be >= 0, got {rounds}")
    if not finalists:
        raise ConfigError("refinement starts from at least one measured finalist")
    ref = torch.cat(list(reference))  # (N, T-1, V)
    pool, best = list(finalists), finalists[0]
    next_rank = 1 + max(f.mip_rank for f in finalists)
    out: list[Refined] = []
    for r in range(rounds):
        t0 = time.perf_counter()
        base = best.solution.layer_labels()
        only = {l: {f.solution.layer_labels()[l] for f in pool} for l in range(len(base))}
        scores = context_scores(library, base, ids, ref, only=only, progress=progress)
        s = solve(scores.problem(problem), backend=backend)
        if any(s.layer_labels() == f.solution.layer_labels() for f in pool):
            break  # the best child itself, or one measured already: nothing new near it
        s = on_problem(problem, s)
        child = library.assemble(blocks_from_list(s.block_configs()))
        f = Finalist(mip_rank=next_rank + len(out), solution=s, quality=measure(child, ids, list(reference)))
        del child
        out.append(Refined(round=r, finalist=f, context_predicted_kl=scores.predict(s.layer_labels()),
                           base_kl=scores.base_kl, seconds=time.perf_counter() - t0))
        pool.append(f)
        if f.kl < best.kl:
            best = f
    return out
