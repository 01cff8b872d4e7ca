"""What every stage of a search receives: the plan, the stage results so far, the shared parent.

    ctx.plan                    the resolved plan (settings, target, scenarios, limits)
    ctx.parent / ctx.tokenizer  loaded once, on first use
    ctx.out("bld", "library")   an output of an earlier stage (paths absolute, inside the run)
    ctx.sha("bld")              the hash of that stage's outputs (what later stages' keys include)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from puzzle.distill.child_bld import ChildBLDResult

from puzzle.search.plan import Plan
from puzzle.search.stages import StageResult

log = logging.getLogger(__name__)


class StageContext:
    """Lazily loaded shared objects (parent, tokenizer) and the stage results so far."""

    def __init__(self, plan: Plan, run_dir: Path, progress: bool) -> None:
        self.plan, self.run_dir, self.progress = plan, run_dir, progress
        self.results: dict[str, StageResult] = {}
        self._parent: Any = None
        self._tokenizer: Any = None
        self.group: Any = None
        """The process group (:class:`puzzle.search.ranks.Group`) the search runs in."""
        self.shared_dir: Path = run_dir
        """Where the budget-independent stages and caches are (a frontier's searches share it)."""

    @property
    def source(self) -> Any:
        from puzzle.loading import resolve_source

        return resolve_source(self.plan.model)

    @property
    def parent(self) -> Any:
        if self._parent is None:
            from puzzle.loading import load_model

            self._parent = load_model(self.source)
        return self._parent

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from puzzle.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.source)
        return self._tokenizer

    def sha(self, stage: str) -> str:
        """The hash of ``stage``'s recorded outputs: a later stage's key includes it."""
        return self.results[stage].outputs_sha256

    def out(self, stage: str, name: str) -> Any:
        return self.results[stage].outputs[name]


def library_config(plan: Plan) -> Any:
    """The block library's settings for this plan: the default search space, the plan's data, BLD tokens and seed."""
    from block_library import LibraryConfig
    from puzzle.data.config import DataConfig
    from puzzle.search.plan import plan_space

    steps = max(1, plan.bld_tokens // (8 * 256))
    return LibraryConfig(space=plan_space(plan), data=DataConfig(sources=plan.data)).with_bld(
        tokens=plan.bld_tokens, checkpoint_every=max(1, steps // 4), calib_sequences=plan.bld_eval_sequences,
        val_sequences=plan.bld_eval_sequences, seed=plan.seed, ffn_refit=bool(plan.ffn_refit))


def child_bld(ctx: StageContext, model: Any, directory: Path) -> ChildBLDResult:
    """Child-aware BLD of ``model`` as the plan says (:mod:`puzzle.distill.child_bld`), on the train split's
    sequences after the library's calibration and BLD ones; checkpoints and ``losses.csv`` in ``directory``.
    The search's child and its baselines get the same."""
    from puzzle.distill.child_bld import ChildBLDConfig, ChildBLDResult, replaced_subblocks, train_child_blocks

    if not replaced_subblocks(model, ctx.parent):  # the parent's own sub-blocks and no-ops: nothing to train or read
        return ChildBLDResult(model=model, trained=[], steps=0, tokens=0, seconds=0.0)
    cfg = ChildBLDConfig(tokens=ctx.plan.child_bld_tokens, seed=ctx.plan.seed, refit=bool(ctx.plan.child_refit))
    ids = child_bld_ids(ctx.plan, ctx.tokenizer, cfg)
    return train_child_blocks(model, ctx.parent, ids, cfg, directory=directory, progress=ctx.progress)


def child_refit_key(plan: Plan) -> dict[str, Any]:
    """The child-stream refit's part of a stage key: its settings when it is on, nothing when off (runs from before
    the setting keep their keys)."""
    from puzzle.distill.child_bld import ChildBLDConfig

    if not plan.child_refit:
        return {}
    cfg = ChildBLDConfig(tokens=1)
    return {"child_refit": {"drift": cfg.refit_drift, "ridge": cfg.refit_ridge, "select": cfg.refit_select}}


def gkd_teacher(ctx: StageContext, cfg: Any) -> Any:
    """The parent's cached GKD targets on ``cfg``'s tokens (a ``GKDConfig``) with the plan's ``gkd_top_k``, or None
    (0: a live parent). Kept in ``<shared dir>/teacher/``: computed once, read by the child's GKD, every baseline's
    and every search sharing the directory on the same tokens (other seeds visit the same sequences)."""
    from puzzle.distill.gkd import gkd_train_ids
    from puzzle.distill.teacher_cache import teacher_targets

    if not ctx.plan.gkd_top_k:
        return None
    k = min(ctx.plan.gkd_top_k, ctx.parent.config.vocab_size)  # a tiny vocabulary: every token, the exact KL
    path = ctx.shared_dir / "teacher" / f"gkd-top{k}.safetensors"
    return teacher_targets(ctx.parent, gkd_train_ids(cfg, ctx.tokenizer), k, path, progress=ctx.progress)


def child_bld_ids(plan: Plan, tokenizer: Any, cfg: Any) -> Any:
    """Child-aware BLD's training ids for ``cfg`` (a ``ChildBLDConfig``): the train split's sequences after the
    library's calibration and BLD ones."""
    from puzzle.distill.child_bld import training_ids

    return training_ids(plan.data, tokenizer, cfg, skip=plan.bld_eval_sequences + plan.bld_tokens // cfg.seq_len)


def resume_or_restart(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a resumable stage function; if its directory holds work of other inputs (an earlier key of
    this stage, interrupted), start it over: the stage key, not the old files, decides what is valid."""
    from puzzle.errors import StaleArtifactError

    try:
        return fn(*args, **kwargs)
    except StaleArtifactError as e:
        log.info("%s; starting it over", e)
        return fn(*args, force=True, **kwargs)


def costing_target(plan: Plan, profile_dir: Path) -> Any:
    """The plan's target, with this machine's fitted efficiencies when the plan calibrates."""
    from puzzle.profiler.calibrate import calibrate_target

    path = Path(profile_dir) / "calibration.json"
    if plan.calibrate and path.is_file():
        return calibrate_target(plan.target, None, (), (), measure=False, calibration=path)
    return plan.target


def solve_problem(ctx: StageContext, *, constraints: bool = True) -> Any:
    """The run's MIP: scores (KL) and costs of every library variant the plan's engine loads, the plan's limits
    and constraints."""
    import pandas as pd

    from puzzle.engines import engine_rules
    from puzzle.engines.problem import engine_problem
    from puzzle.errors import solver_errors
    from solvers.io import problem_from_tables
    from solvers.parse import parse_constraint

    plan = ctx.plan
    with solver_errors():
        problem = problem_from_tables(pd.read_csv(ctx.out("score", "scores")), pd.read_csv(ctx.out("profile", "costs")),
                                      score_column="kl", budget=plan.limits, scenario=plan.budget_scenario,
                                      constraints=[parse_constraint(c) for c in plan.constraints] if constraints else [])
        return engine_problem(problem, engine_rules(plan.engine))
