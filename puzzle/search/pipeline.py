"""``search``: parent -> block library -> BLD -> scores -> costs -> MIP -> child-aware BLD -> fusion -> GKD -> export
-> evaluation.

    from puzzle.search import SearchConfig, search
    run = search(SearchConfig(budget="8xH100", speedup=1.5), "runs/smollm2")
    run.export_dir          # the deployable DeciLM checkpoint
    run.report              # parent vs child: params, memory, predicted / measured speed, quality

The config is resolved once into a :class:`~puzzle.search.plan.Plan` and checked (model, data,
target, budget feasibility, run directory) before anything is written; ``run_dir/plan.json``
records it. Every stage lives in ``run_dir/<stage>/`` with a ``stage.json`` manifest (see
:mod:`puzzle.search.stages`): a rerun skips stages whose key and recorded files did not change,
an interrupted run resumes (BLD from its checkpoint, scoring from its finished layers), and
changing only the budget re-solves without retraining. A stage's key holds its settings and the
hashes of the *outputs* of the stages it reads, so redoing one stage redoes exactly the ones after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from puzzle.errors import ConfigError
from puzzle.evaluation.engine_speed import ENGINES_TIMED, engine_available
from puzzle.io import atomic_write_json, atomic_write_text
from puzzle.search.compare import stage_baselines
from puzzle.search.config import SearchConfig
from puzzle.search.context import (StageContext, child_bld, child_refit_key, gkd_teacher, library_config, resume_or_restart,
                                   solve_problem)
from puzzle.search.finalists import finalist_skip
from puzzle.search.plan import Plan, resolve
from puzzle.search.preflight import PLAN_FILE, RUN_FILE, preflight
from puzzle.search.ranks import Group, join
from puzzle.search.stages import StageResult, clean_temporaries, inspect_stage, run_stage

log = logging.getLogger(__name__)

STAGES = ("library", "bld", "score", "profile", "solve", "child_bld", "fuse", "gkd", "export", "evaluate")
SHAREABLE = ("library", "bld", "score", "profile")
SHARDED = ("library", "bld", "score", "fuse", "gkd", "evaluate")
"""Stages whose work runs on every rank under ``torchrun`` (the others run on rank 0; see :mod:`puzzle.search.ranks`)."""
USAGE_FILE = "resources.csv"
"""Per stage and rank: the plan's predicted peak memory and time beside the measured ones."""
"""Stages that do not depend on the speedup / throughput / memory budget: runs may share them (``shared_dir``)."""
RECORD: dict[str, list[str]] = {
    # BLD trains the library in place: the build owns the rest, BLD the trained weights, the index and its logs
    "library": ["library/lib/**", "!library/lib/trained/**", "!library/lib/index.csv", "!library/lib/manifest.json",
                "!library/lib/bld/**"],
    "bld": ["library/lib/trained/**", "library/lib/index.csv", "library/lib/manifest.json", "library/lib/bld/*.csv"],
}
"""Files each stage owns, as globs under its root, where that is not simply ``<stage>/**``."""


@dataclass
class SearchRun:
    directory: Path
    plan: Plan
    stages: dict[str, StageResult] = field(default_factory=dict)

    @property
    def config(self) -> SearchConfig:
        """What the user said; :attr:`plan` holds every resolved setting."""
        return self.plan.config

    @property
    def export_dir(self) -> Path:
        return Path(self.stages["export"].outputs["model"])

    @property
    def report(self) -> pd.DataFrame:
        return pd.read_csv(self.directory / "report.csv")


# ------------------------------------------------------------------------------------------- stages


def stage_library(ctx: StageContext, d: Path) -> dict[str, Any]:
    from block_library import build_library

    lib = d / "lib"
    # the stage runs only when its manifest is not valid: build anew (atomic), which also drops BLD's files
    build_library(ctx.plan.model, lib, library_config(ctx.plan), progress=ctx.progress, overwrite=True,
                  max_memory_bytes=ctx.plan.cluster.memory_per_rank)
    return {"library": str(lib)}


def stage_bld(ctx: StageContext, d: Path) -> dict[str, Any]:
    from block_library import train_library

    lib = ctx.out("library", "library")
    # the stage runs only when its manifest is not valid (new key, lost or damaged file): train for real
    train_library(lib, config=library_config(ctx.plan), progress=ctx.progress, force=True,
                  max_memory_bytes=ctx.plan.cluster.memory_per_rank)  # in rounds that fit, as planned
    return {"library": lib, "tokens": ctx.plan.bld_tokens}


def stage_score(ctx: StageContext, d: Path) -> dict[str, Any]:
    from puzzle.scoring import ScoreConfig, score_library

    p = ctx.plan
    cfg = ScoreConfig(sources=p.data, seq_len=p.score_seq_len, num_sequences=p.score_sequences)
    result = resume_or_restart(score_library, ctx.out("bld", "library"), d / "scores", cfg, progress=ctx.progress)
    return {"scores": str(result.directory / "scores.csv"), "rows": len(result.scores)}


def stage_profile(ctx: StageContext, d: Path) -> dict[str, Any]:
    from puzzle.io import atomic_write_text
    from puzzle.profiler.calibrate import calibrate_target
    from puzzle.profiler.counts import ModelShape
    from puzzle.profiler.table import cost_table, layer_candidates, model_totals

    p, target = ctx.plan, ctx.plan.target
    config, candidates = layer_candidates(ctx.out("bld", "library"))
    shape = ModelShape.from_config(config)
    if p.calibrate:  # time this machine's variants in the run's scenarios; the fit lands in d
        target = calibrate_target(target, shape, candidates, list(p.scenarios), measure=True,
                                  calibration=d / "calibration.json")
    table = cost_table(shape, candidates, config.blocks, target=target, scenarios=list(p.scenarios))
    atomic_write_text(d / "costs.csv", table.to_csv(index=False))
    return {"costs": str(d / "costs.csv"), "target": target.name, "calibrated": bool(p.calibrate),
            "parent": model_totals(table, config.blocks, list(p.scenarios))}


def stage_solve(ctx: StageContext, d: Path) -> dict[str, Any]:
    from puzzle.errors import solver_errors
    from puzzle.schema import blocks_from_list, save_blocks
    from solvers import solve
    from solvers.io import write_json

    p, problem = ctx.plan, solve_problem(ctx)
    measured: dict[str, Any] = {}
    if p.finalists == 1 and not p.refine_rounds:
        with solver_errors():
            solution = solve(problem, backend=p.solver)
    else:  # the MIP's best different children (its optimum first), measured; the lowest KL goes on
        from block_library import open_library
        from puzzle.search.finalists import SEQUENCES, finalist_ids, measure_finalists, parent_logprobs, score_fidelity
        from solvers.diverse import diverse_solutions

        with solver_errors():
            solutions = diverse_solutions(problem, p.finalists, min_fraction=0.1, backend=p.solver)
        ids = finalist_ids(p.data, ctx.tokenizer, skip=finalist_skip(p.eval_sequences), sequences=SEQUENCES)
        lib = open_library(ctx.out("bld", "library"))
        reference = parent_logprobs(ctx.parent, ids)  # once, for the finalists and the refinement
        finalists = measure_finalists(lib, ctx.parent, solutions, ids, reference=reference, progress=ctx.progress)
        table = pd.DataFrame([f.row() for f in finalists])
        spearman = score_fidelity(finalists)
        if p.refine_rounds:  # re-score around the best measured child, solve again; a better child goes on
            from puzzle.search.refine import REFINED_COLUMNS, refine

            with solver_errors():
                steps = refine(problem, lib, finalists, ids, reference, rounds=p.refine_rounds, backend=p.solver,
                               progress=ctx.progress)
            # the refinement's columns are there even when its first round found nothing new
            table = pd.DataFrame([f.row() for f in finalists] + [s.row() for s in steps],
                                 columns=[*table.columns, *REFINED_COLUMNS])
            finalists = sorted(finalists + [s.finalist for s in steps], key=lambda f: (f.kl, f.mip_rank))
        atomic_write_text(d / "finalists.csv", table.to_csv(index=False))
        solution = finalists[0].solution
        measured = {"finalists": len(finalists), "mip_rank": finalists[0].mip_rank, "kl": finalists[0].kl,
                    "spearman": spearman}
        log.info("finalists: MIP rank %d of %d measures the lowest KL, %.4g", finalists[0].mip_rank, len(finalists),
                 finalists[0].kl)
    write_json(d / "solution.json", solution.to_dict())
    blocks = blocks_from_list(solution.block_configs())
    save_blocks(blocks, d / "blocks.json")
    log.info("MIP: %s", solution.summary())
    return {"blocks": str(d / "blocks.json"), "totals": solution.totals.to_dict(), "objective": solution.objective,
            **measured}


def stage_child_bld(ctx: StageContext, d: Path) -> dict[str, Any]:
    from block_library import open_library
    from puzzle.schema import load_blocks

    p = ctx.plan
    lib = open_library(ctx.out("bld", "library"))
    blocks = load_blocks(ctx.out("solve", "blocks"))
    if p.child_bld_tokens == 0:  # off: the MIP's child goes on as it is, written tensor by tensor
        lib.assemble_to(blocks, d / "child", overwrite=True)
        return {"model": str(d / "child"), "tokens": 0}
    from puzzle.loading import save_runtime

    result = child_bld(ctx, lib.assemble(blocks), d)
    save_runtime(result.model, d / "child", overwrite=True)
    log.info("child-aware BLD: %d sub-blocks, NMSE %.4g -> %.4g, %.0f tokens/s", len(result.trained),
             result.summary()["first_nmse"], result.summary()["last_nmse"], result.tokens_per_s)
    return {"model": str(d / "child"), "losses": str(d / "losses.csv"), **result.summary()}


def stage_fuse(ctx: StageContext, d: Path) -> dict[str, Any]:
    from puzzle.fusion import FusionConfig

    p = ctx.plan
    source = ctx.out("child_bld", "model")
    fcfg = FusionConfig(threshold=max(p.fuse_threshold, 1e-9), sources=p.data, calib_sequences=p.fuse_sequences,
                        eval_sequences=p.fuse_sequences, distill_steps=p.fuse_distill_steps,
                        targets=(p.target,), dtype=p.target.dtype, measure=False)
    if p.fuse_threshold == 0:  # fusion off: the child goes on as it is
        return {"model": source, "segments": []}
    if _world(ctx) > 1:  # every rank fuses its layers, read from the child's directory
        from puzzle.fusion.sharded import fuse_sharded

        result = fuse_sharded(source, ctx.tokenizer, fcfg, d / "fusion", parent=ctx.source.directory,
                              source=p.model, tokenizer_dir=ctx.source.directory, overwrite=True,
                              progress=ctx.progress)
        return {"model": str(d / "fusion" / "model"), "segments": [s.label for s in result.segments]}
    from puzzle.fusion import fuse_and_report
    from puzzle.fusion.artifact import write_fusion
    from puzzle.loading import load_model

    child = load_model(source)
    result = fuse_and_report(child, ctx.tokenizer, fcfg, parent=ctx.parent, progress=ctx.progress)
    write_fusion(result, d / "fusion", config=fcfg, source=p.model, source_dir=ctx.source.directory, overwrite=True)
    return {"model": str(d / "fusion" / "model"), "segments": [s.label for s in result.segments]}


def stage_gkd(ctx: StageContext, d: Path) -> dict[str, Any]:
    from puzzle.distill import GKDConfig, distill_child
    from puzzle.loading import load_layers, load_model, save_runtime

    p = ctx.plan
    if p.gkd_steps == 0:  # the fused (or assembled) child goes on as it is
        return {"model": ctx.out("fuse", "model"), "steps": 0}
    from puzzle.search.resources import Work, gkd_memory_options

    checkpointing, offload = gkd_memory_options(p.parent_config, Work.from_plan(p), p.cluster)  # as planned
    # GKD's own validation (before and after) is a progress check: no larger than the final evaluation
    gcfg = GKDConfig(sources=p.data, steps=p.gkd_steps, batch=p.gkd_batch, seed=p.seed,
                     val_sequences=min(GKDConfig.val_sequences, p.eval_sequences),
                     activation_checkpointing=checkpointing, offload=offload)
    if _world(ctx) > 1:  # FSDP2: every rank reads its shards of both models from their files
        import torch

        teacher_dtype = torch.bfloat16 if not p.cluster.is_cpu else torch.float32
        child, parent = load_layers(ctx.out("fuse", "model"), []), load_layers(ctx.source, [], dtype=teacher_dtype)
        result = resume_or_restart(distill_child, child, parent, ctx.tokenizer, d / "gkd", gcfg,
                                   progress=ctx.progress)
        return {"model": str(d / "gkd" / "child"), "steps": p.gkd_steps, "initial": result.initial,
                "final": result.final}
    child = load_model(ctx.out("fuse", "model"))
    result = resume_or_restart(distill_child, child, ctx.parent, ctx.tokenizer, d / "gkd", gcfg, progress=ctx.progress,
                               teacher=gkd_teacher(ctx, gcfg))
    save_runtime(result.model, d / "child", overwrite=True)
    return {"model": str(d / "child"), "steps": p.gkd_steps, "initial": result.initial, "final": result.final}


def stage_export(ctx: StageContext, d: Path) -> dict[str, Any]:
    from puzzle.engines import check_loadable, engine_rules, loaders
    from puzzle.export import export_decilm_dir
    from puzzle.loading import load_config

    child = load_config(ctx.out("gkd", "model"))
    check_loadable(engine_rules(ctx.plan.engine), child.blocks, child, what="the child")  # the MIP kept to it
    # tensor by tensor: the child is never whole in memory
    export_decilm_dir(ctx.out("gkd", "model"), d / "model", source_dir=ctx.source.directory, overwrite=True)
    return {"model": str(d / "model"), "layers": child.num_hidden_layers, "engines": loaders(child.blocks, child)}


def stage_evaluate(ctx: StageContext, d: Path) -> dict[str, Any]:
    from puzzle.evaluation import evaluate
    from puzzle.loading import load_model

    p = ctx.plan
    if _world(ctx) > 1:  # every rank holds its layers of one model at a time; rank 0 times them whole if asked
        from puzzle.evaluation import Evaluation, evaluate_sharded, measure_speed

        quality = evaluate_sharded(ctx.out("export", "model"), ctx.source.directory, ctx.tokenizer, sources=p.data,
                                   num_sequences=p.eval_sequences, progress=ctx.progress)
        data = {"sources": list(p.data), "split": "validation", "seq_len": 256, "sequences": p.eval_sequences}
        if not ctx.group.first:
            return {}
        speed = None
        if p.measure_speed:
            speed = measure_speed({"parent": ctx.parent, "model": load_model(ctx.out("export", "model"))},
                                  list(p.scenarios))
        ev = Evaluation(quality=quality, tasks={}, speed=speed, data=data)
    else:
        child = load_model(ctx.out("export", "model"))
        ev = evaluate(child, ctx.tokenizer, parent=ctx.parent, sources=p.data, num_sequences=p.eval_sequences,
                      speed=p.measure_speed, scenarios=list(p.scenarios))
    doc = ev.to_dict()
    if p.measure_speed and p.target.is_cpu and p.engine in ENGINES_TIMED and engine_available(p.engine):
        # the budget's device is this one: time parent and child inside the engine too, beside the prediction
        from puzzle.evaluation.engine_speed import engine_speed
        from puzzle.search.context import costing_target

        table = engine_speed(ctx.out("export", "model"), ctx.source.directory, list(p.scenarios), engine=p.engine,
                             target=costing_target(p, Path(ctx.out("profile", "costs")).parent), progress=ctx.progress)
        atomic_write_text(d / "engine_speed.csv", table.to_csv(index=False))
        doc["engine_speed"] = table.to_dict("records")
    atomic_write_json(d / "evaluation.json", doc)
    return {"evaluation": str(d / "evaluation.json"), **{k: v for k, v in doc.items() if k != "tasks"}}



def _world(ctx: StageContext) -> int:
    return ctx.group.world if ctx.group is not None else 1


STAGE_FUNCTIONS: dict[str, Callable[[StageContext, Path], dict[str, Any]]] = {
    "library": stage_library, "bld": stage_bld, "score": stage_score, "profile": stage_profile,
    "solve": stage_solve, "child_bld": stage_child_bld, "fuse": stage_fuse, "gkd": stage_gkd, "export": stage_export, "evaluate": stage_evaluate,
    "baselines": stage_baselines,
}


def stage_key(plan: Plan, stage: str, upstream: dict[str, str], parent_fingerprint: str) -> dict[str, Any]:
    """What ``stage``'s result depends on: its settings and the output hashes of the stages it reads."""
    p, up = plan, upstream
    if stage == "library":
        lib = library_config(p)
        return {"parent": parent_fingerprint, "library": lib.sha256("space", "data"),
                **({"ffn_refit": {"ridge": lib.bld.ffn_ridge}} if p.ffn_refit else {})}  # off: older runs' keys
    if stage == "bld":
        return {"library": up["library"], "bld": library_config(p).sha256()}
    if stage == "score":
        return {"bld": up["bld"], "data": list(p.data), "seq_len": p.score_seq_len, "sequences": p.score_sequences}
    if stage == "profile":
        return {"library": up["library"], "target": p.target.to_dict(), "calibrate": p.calibrate,
                "scenarios": [sc.to_dict() for sc in p.scenarios]}
    limits = {"speedup": p.speedup, "throughput": p.throughput, "memory": p.memory,
              "scenario": p.budget_scenario.to_dict()}
    if stage == "solve":
        return {"score": up["score"], "profile": up["profile"], **limits, "solver": p.solver,
                "constraints": list(p.constraints), "finalists": p.finalists,
                **({"bld": up["bld"], "data": list(p.data), "after": finalist_skip(p.eval_sequences)}
                   if p.finalists > 1 or p.refine_rounds else {}),
                **({"refine_rounds": p.refine_rounds} if p.refine_rounds else {})}
    if stage == "child_bld":
        return {"solve": up["solve"], "bld": up["bld"], "tokens": p.child_bld_tokens, "seed": p.seed, "data": list(p.data),
                "after": [p.bld_eval_sequences, p.bld_tokens], **child_refit_key(p)}
    if stage == "fuse":
        return {"child_bld": up["child_bld"], "threshold": p.fuse_threshold, "sequences": p.fuse_sequences,
                "distill": p.fuse_distill_steps, "target": p.target.to_dict()}
    if stage == "gkd":
        return {"fuse": up["fuse"], "steps": p.gkd_steps, "batch": p.gkd_batch, "seed": p.seed, "data": list(p.data),
                "top_k": p.gkd_top_k}
    if stage == "export":
        return {"gkd": up["gkd"]}
    if stage == "evaluate":
        return {"export": up["export"], "sequences": p.eval_sequences, "speed": p.measure_speed,
                "scenarios": [sc.to_dict() for sc in p.scenarios]}
    # baselines: the same budget on the same costs, the same GKD and evaluation; the puzzle child to time against
    return {"bld": up["bld"], "score": up["score"], "profile": up["profile"], "evaluate": up["evaluate"],
            "names": list(p.baselines), **limits, "child_bld": [p.child_bld_tokens, p.seed],
            **child_refit_key(p),
            "gkd": [p.gkd_steps, p.gkd_batch, p.seed, p.gkd_top_k], "data": list(p.data),
            "sequences": [p.fuse_sequences, p.eval_sequences], "speed": p.measure_speed}


def stage_names(plan: Plan) -> tuple[str, ...]:
    return STAGES + (("baselines",) if plan.baselines else ())


def planned_stages(plan: Plan, run_dir: str | Path, *, shared_dir: str | Path | None = None,
                   verify: bool = False) -> list[dict[str, str]]:
    """What :func:`search` would do in ``run_dir``, stage by stage: ``{"stage", "action": run | skip, "reason"}``.

    Reads manifests and file sizes (hashes with ``verify``); writes nothing.
    """
    from block_library.session import parent_fingerprint
    from puzzle.loading import resolve_source

    run_dir = Path(run_dir).expanduser().resolve()
    shared = Path(shared_dir).expanduser().resolve() if shared_dir is not None else run_dir
    fp = parent_fingerprint(resolve_source(plan.model))
    upstream: dict[str, str] = {}
    rows, first_run = [], None
    for stage in stage_names(plan):
        root = shared if stage in SHAREABLE else run_dir
        if first_run is not None:
            rows.append({"stage": stage, "action": "run", "reason": f"after {first_run}"})
            continue
        check = inspect_stage(root, stage, stage_key(plan, stage, upstream, fp), record=RECORD.get(stage),
                              verify=verify)
        rows.append({"stage": stage, "action": check.action, "reason": check.reason})
        if check.action == "run":
            first_run = stage
        else:
            upstream[stage] = str(check.outputs_sha256)
    return rows


def search(config: SearchConfig | Plan, run_dir: str | Path, *, progress: bool = True,
           echo: Callable[[str], None] | None = None, shared_dir: str | Path | None = None,
           verify: bool = False, force: bool = False) -> SearchRun:
    """Run (or resume) every stage of a search in ``run_dir``; see the module docstring.

    ``config``: what the user said (resolved here) or a plan. Everything is checked before the first
    write (:func:`puzzle.search.preflight.preflight`). ``shared_dir``: where the budget-independent
    stages (:data:`SHAREABLE`) live, so runs at different budgets train once (default: ``run_dir``).
    ``verify``: re-hash every recorded file of a stage before skipping it (sizes are always checked).
    ``force``: allow a run directory that holds other files.
    """
    from puzzle.peak import frozen_heap

    with frozen_heap():  # each stage's release_memory then scans only what the search itself created
        return _search(config, run_dir, progress=progress, echo=echo, verify=verify, force=force,
                       shared_dir=shared_dir)


def _search(config: SearchConfig | Plan, run_dir: str | Path, *, progress: bool, echo: Callable[[str], None] | None,
            verify: bool, force: bool, shared_dir: str | Path | None) -> SearchRun:
    from block_library.session import parent_fingerprint
    from puzzle.peak import peak_rss_bytes, pin_mmap_threshold, release_memory, reset_peak
    from puzzle.search.report import write_report

    group = join()
    plan = config if isinstance(config, Plan) else resolve(config)
    check_group(plan, group)
    run_dir = preflight(plan, run_dir, force=force)
    shared = Path(shared_dir).expanduser().resolve() if shared_dir is not None else run_dir
    if shared != run_dir:
        preflight(plan, shared, force=force)
    group.barrier()  # every rank has checked the run directory before rank 0 writes into it
    if group.first:
        _prepare(plan, run_dir, shared)
    group.barrier()
    pin_mmap_threshold()  # freed weights leave RSS: each stage's measured peak is its own
    ctx = StageContext(plan, run_dir, progress and group.first)
    ctx.group, ctx.shared_dir = group, shared
    run = SearchRun(directory=run_dir, plan=plan)
    fp = parent_fingerprint(ctx.source)
    upstream: dict[str, str] = {}
    stages = stage_names(plan)
    usage: list[dict[str, Any]] = []
    earlier = pd.read_csv(run_dir / USAGE_FILE) if (run_dir / USAGE_FILE).is_file() else pd.DataFrame(columns=["stage"])
    for k, stage in enumerate(stages, start=1):
        root = shared if stage in SHAREABLE else run_dir
        key = stage_key(plan, stage, upstream, fp)
        release_memory()
        reset_peak()
        result = _run_on_group(group, ctx, root, stage, key, verify=verify)
        ctx.results[stage] = run.stages[stage] = result
        upstream[stage] = result.outputs_sha256
        usage += _usage(group, plan, stage, result, peak_rss_bytes(), _chosen_child(ctx, stage))
        if group.first:
            _write_usage(run_dir / USAGE_FILE, usage, earlier)
        if echo is not None and group.first:
            if result.skipped:
                what = "up to date, skipped"
            else:
                why = result.reason if result.reason and not result.reason.endswith("never completed") else ""
                what = f"done in {result.seconds:.0f} s" + (f" ({why})" if why else "")
            echo(f"[{k}/{len(stages)}] {stage}: {what}")
    if group.first:
        write_report(run, ctx)
    group.barrier()
    return run


def check_group(plan: Plan, group: Group) -> None:
    """A search under ``torchrun`` runs on exactly the cluster the plan sized, on stages that shard."""
    if group.world == 1:
        return
    if plan.cluster.count != group.world:
        raise ConfigError(f"--cluster {plan.cluster.name} plans {plan.cluster.count} ranks but torchrun started "
                          f"{group.world}; pass --cluster {group.world}x{plan.cluster.device}")
    if plan.baselines:
        raise ConfigError("--baselines runs in one process; drop it under torchrun (or run the baselines later "
                          "in one process on the same run directory, with --finalists 1 --child-bld-tokens 0 as this "
                          "cluster has them)")
    if plan.gkd_steps and plan.gkd_batch % group.world:
        raise ConfigError(f"--gkd-batch {plan.gkd_batch} does not split over {group.world} ranks; use a multiple "
                          f"of {group.world}")


def _prepare(plan: Plan, run_dir: Path, shared: Path) -> None:
    """Rank 0: clean leftovers of interrupted writes, write the plan and the run record."""
    from puzzle import __version__

    for root in {run_dir, shared}:
        root.mkdir(parents=True, exist_ok=True)
        # a shared root may be in use by another search right now: only leftovers older than an hour go
        for path, size in clean_temporaries(root, min_age_s=0.0 if root == run_dir else 3600.0):
            log.warning("removed %s (%.1f MiB) left by an interrupted run", path, size / 2**20)
    if shared != run_dir and not (shared / RUN_FILE).is_file():  # marks it as a run directory for later preflights
        atomic_write_json(shared / RUN_FILE, {"puzzle": __version__, "shared": SHAREABLE})
    atomic_write_json(run_dir / PLAN_FILE, plan.to_dict())
    atomic_write_json(run_dir / RUN_FILE, {"puzzle": __version__, "config": plan.config.to_dict(),
                                           "settings": plan.values()})


def _run_on_group(group: Group, ctx: StageContext, root: Path, stage: str, key: dict[str, Any], *,
                  verify: bool) -> StageResult:
    """Rank 0 decides and records; a sharded stage's work runs on every rank between two barriers."""
    fn = STAGE_FUNCTIONS[stage]
    sharded = group.world > 1 and stage in SHARDED
    if group.first:
        def work(d: Path) -> dict[str, Any]:
            if not sharded:
                return fn(ctx, d)
            group.broadcast(("run", str(d)))  # the other ranks start once the stage directory is ready
            out = fn(ctx, d)
            group.barrier()  # every rank's files are written before rank 0 records them
            return out

        result = run_stage(root, stage, key, work, record=RECORD.get(stage), verify=verify)
        if sharded and result.skipped:
            group.broadcast(("skip", None))
    elif sharded:
        action, d = group.broadcast(None)
        if action == "run":
            fn(ctx, Path(d))
            group.barrier()
    return group.broadcast(result if group.first else None)


def _write_usage(path: Path, usage: list[dict[str, Any]], old: pd.DataFrame) -> None:
    """The run's resources table: this run's rows for the stages it ran, an earlier run's (``old``, read
    when the search started) for those it skipped."""
    parts = []
    for stage in dict.fromkeys(u["stage"] for u in usage):
        now = pd.DataFrame([u for u in usage if u["stage"] == stage])
        before = old[old.stage == stage]
        parts.append(before if now.skipped.all() and len(before) else now)
    atomic_write_text(path, pd.concat(parts).to_csv(index=False))


def _chosen_child(ctx: StageContext, stage: str) -> Any:
    """The child a stage after the MIP works on (its config): the MIP's for fusion, the fused one after."""
    from puzzle.loading import load_config
    from puzzle.schema import load_blocks

    if stage in ("child_bld", "fuse") and "solve" in ctx.results:
        return ctx.plan.parent_config.with_blocks(load_blocks(ctx.out("solve", "blocks")))
    if stage in ("gkd", "export", "evaluate") and "fuse" in ctx.results:
        return load_config(ctx.out("fuse", "model"))
    return None


def _usage(group: Group, plan: Plan, stage: str, result: StageResult, peak: int, child: Any = None
           ) -> list[dict[str, Any]]:
    """Rank 0: every rank's measured peak RSS and wall time of ``stage`` beside the plan's predictions
    (for the stages after the MIP, the plan redone for the child it chose: the upfront plan assumes the
    largest child, the parent)."""
    import dataclasses

    from puzzle.search.plan import plan_space
    from puzzle.search.resources import Work, plan_resources

    rows = group.gather((group.rank, peak))
    if not group.first or rows is None:
        return []
    resources = plan.resources
    if child is not None:
        work = dataclasses.replace(Work.from_plan(plan), child=child)
        resources = plan_resources(plan.parent_config, work, plan.cluster, space=plan_space(plan), search=False)
    use = resources.stage(stage) if stage in resources.stage_names else None
    out = []
    for rank, measured in rows:
        r = use.ranks[rank] if use is not None and rank < len(use.ranks) else None
        out.append({"stage": stage, "rank": rank, "skipped": result.skipped,
                    "predicted_peak_gib": r.device_bytes / 2**30 if r else float("nan"),
                    "measured_peak_gib": measured / 2**30,
                    "predicted_s": r.seconds if r else float("nan"), "measured_s": result.seconds,
                    "rounds": r.rounds if r else 1})
    return out
