"""The custom constraints and the budget, checked before any stage runs, on the analytic costs.

    check_constraints(plan)     # ConfigError: a layer, attribute or variant that does not exist;
                                # InfeasibleBudgetError: the budget and the constraints cannot all be met

The solve stage's MIP has one candidate per (layer, ``ATTENTION|FFN``) of the block library, with the
score stage's scores and the profile stage's costs. The library's variants are the plan's search space
(:func:`puzzle.search.plan.plan_space`, enumerated per layer by
:meth:`block_library.space.SearchSpace.layer_variants`, as :func:`puzzle.profiler.table.space_candidates`
does), so the same candidates exist before the library does: here they are costed analytically
(:func:`puzzle.profiler.table.cost_table`, on the plan's target and scenarios: what the profile stage
writes on a target it does not calibrate) and scored zero, and the problem the solve stage will build is
built now, minutes of library, BLD and scoring earlier.

On it, every constraint is compiled (the solver's own checks: ``layer[99]`` on a 30-layer parent, an
attribute no candidate has, a variant that is neither in the space nor a valid label), and a MIP with the
zero objective looks for any child that meets the budget and the constraints together (an infeasible one
is refused with the solver's diagnosis, in the constraints' units). What the analytic problem cannot know
is left out of that solve rather than guessed:

* the scores (``kl``, ``loss_delta``, ``top1_disagreement``, ``scored``) exist only after the score
  stage: a constraint that reads one is compiled (its names checked) but not solved for;
* on a calibrated target (``calibrate``: the cpu) the profile stage refits the step times, so the speedup
  and throughput bounds are relaxed by the resolver's slack (:data:`~puzzle.search.resolver.CALIBRATED_SLACK`)
  and a constraint on a step-time column (``total(decode_ms)``) is compiled only.

Counts, layer pins, parameters and bytes are what the solve stage will see, exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from puzzle.errors import ConfigError, InfeasibleBudgetError
from puzzle.search.plan import Plan, plan_space

log = logging.getLogger(__name__)

SCORE_ATTRIBUTES = ("kl", "loss_delta", "top1_disagreement", "scored")
"""The score stage's columns (:data:`puzzle.scoring.tables.SCORE_COLUMNS` less the keys): unknown before it runs."""
TIME_LIMIT_S = 20.0
"""A feasibility solve that finds nothing in this time decides nothing (the search goes on; the solve stage
answers then): SCIP answers SmolLM2-sized problems in well under a second."""


def check_constraints(plan: Plan) -> None:
    """Refuse, before any stage runs, a constraint that names what the parent or the search space lacks
    (:class:`ConfigError`), and a budget with constraints that no child of the space meets
    (:class:`InfeasibleBudgetError`); see the module docstring. Writes nothing."""
    from solvers.parse import parse_constraint

    texts = tuple(plan.value("constraints") or ())
    limits = [v for v in (plan.limits.speedup, plan.limits.throughput, plan.limits.memory_bytes) if v is not None]
    if not texts and len(limits) <= 1:  # one budget bound alone: plan.check_feasible's analytic extreme is exact
        return
    parsed = [_parsed(text, parse_constraint) for text in texts]
    problem = analytic_problem(plan)
    for text, constraint in zip(texts, parsed, strict=True):
        _compile(text, constraint, problem)
    approximate = bool(plan.value("calibrate"))
    solvable = [c for c in parsed if not _unknowable(c, plan, approximate=approximate)]
    _solve(plan, problem.replace(budget=_budget(plan, approximate=approximate), constraints=tuple(solvable)),
           left_out=len(parsed) - len(solvable))


def analytic_problem(plan: Plan) -> Any:
    """The solve stage's MIP (:func:`puzzle.search.stages.solve.solve_problem`) on the analytic costs of the
    plan's search space and zero scores, with the plan's budget and no custom constraint; the engine's
    candidates only (:func:`puzzle.engines.problem.engine_problem`)."""
    from puzzle.engines import engine_rules
    from puzzle.engines.problem import engine_problem
    from puzzle.errors import solver_errors
    from puzzle.profiler.counts import ModelShape
    from puzzle.profiler.table import cost_table, space_candidates
    from solvers.io import problem_from_tables

    config = plan.parent_config
    candidates = space_candidates(config, space=plan_space(plan))
    costs = cost_table(ModelShape.from_config(config), candidates, config.blocks, target=plan.target,
                       scenarios=list(plan.scenarios))
    with solver_errors():
        problem = problem_from_tables(_zero_scores(costs), costs, score_column="kl", budget=plan.limits,
                                      scenario=plan.budget_scenario)
        return engine_problem(problem, engine_rules(plan.engine))


def _zero_scores(costs: pd.DataFrame) -> pd.DataFrame:
    """The score stage's table with every score zero. ``scored`` says how its default (``pairs: additive``)
    fills a row: ``measured`` where one half is the parent's, ``additive`` where both differ."""
    rows = costs[costs["layer"] >= 0][["layer", "variant", "is_parent"]].copy()
    halves = rows["variant"].str.split("|", expand=True)
    parent = rows[rows["is_parent"].astype(bool)].set_index("layer")["variant"].str.split("|", expand=True)
    same_attention = halves[0].to_numpy() == parent[0].reindex(rows["layer"]).to_numpy()
    same_ffn = halves[1].to_numpy() == parent[1].reindex(rows["layer"]).to_numpy()
    rows["scored"] = ["measured" if a or f else "additive" for a, f in zip(same_attention, same_ffn, strict=True)]
    return rows.assign(kl=0.0, loss_delta=0.0, top1_disagreement=0.0)


def _parsed(text: str, parse: Any) -> Any:
    from solvers.errors import ConstraintSyntaxError

    try:
        return parse(text)
    except ConstraintSyntaxError as e:  # the settings table parsed it already; a plan built by hand may not have
        raise ConfigError(str(e)) from None


def _compile(text: str, constraint: Any, problem: Any) -> None:
    """The solver's own name checks, as the solve stage would run them; one line naming the constraint."""
    from solvers.errors import ProblemError

    try:
        constraint.compile(problem)
    except ProblemError as e:
        reason = str(e).removeprefix(f"{text}: ")
        raise ConfigError(f"constraint {text!r}: {reason}") from None


def _columns(constraint: Any) -> set[str]:
    """The attributes and columns a parsed constraint reads (:mod:`solvers.expressions`' terms)."""
    out: set[str] = set()
    for _, term in constraint.expr.terms:
        if hasattr(term, "column"):  # total(column)
            out.add(term.column)
        if hasattr(term, "pred"):  # count(pred), layer[i] == value
            out.update(name for name, _, _ in term.pred.atoms)
    return out


def _unknowable(constraint: Any, plan: Plan, *, approximate: bool) -> bool:
    """Whether the analytic problem cannot tell if ``constraint`` holds: it reads a score, or a step time that
    the profile stage will refit."""
    read = _columns(constraint)
    times = {sc.column for sc in plan.scenarios} if approximate else set()
    return bool(read & (set(SCORE_ATTRIBUTES) | times))


def _budget(plan: Plan, *, approximate: bool) -> Any:
    """The plan's budget; on a calibrated target the step-time bounds relaxed as the resolver relaxes them."""
    import dataclasses

    from puzzle.search.resolver import CALIBRATED_SLACK

    limits = plan.limits
    if not approximate:
        return limits
    return dataclasses.replace(limits, speedup=None if limits.speedup is None else limits.speedup / CALIBRATED_SLACK,
                               throughput=None if limits.throughput is None else limits.throughput / CALIBRATED_SLACK)


def _solve(plan: Plan, problem: Any, *, left_out: int) -> None:
    """Any child of the space that meets ``problem``'s budget and constraints, or :class:`InfeasibleBudgetError`."""
    from solvers import solve
    from solvers.errors import InfeasibleError, SolverFailure

    if not problem.all_constraints():
        return
    try:
        solve(problem, backend=str(plan.value("solver")), time_limit=TIME_LIMIT_S)
    except InfeasibleError as e:
        known = " (the constraints on scores are checked at the solve stage)" if left_out else ""
        reason = str(e).removeprefix("infeasible: ")
        raise InfeasibleBudgetError(f"infeasible: no child of the search space meets the budget and the constraints together "
                                    f"on the analytic costs of {plan.target.name}{known}: {reason}") from e
    except SolverFailure as e:  # no answer in time: undecided here, the solve stage decides
        log.warning("the budget and the constraints were not checked before the search: %s", e)
