"""``search``: parent -> block library -> BLD -> scores -> costs -> MIP -> fusion -> GKD -> export -> evaluation.

    from puzzle.search import SearchConfig, search
    run = search(SearchConfig(budget="8xH100", speedup=1.5), "runs/smollm2")
    run.export_dir          # the deployable DeciLM checkpoint
    run.report              # parent vs child: params, memory, predicted / measured speed, quality

Every stage lives in ``run_dir/<stage>/`` with a ``stage.json`` manifest (see
:mod:`puzzle.search.stages`): a rerun skips stages whose inputs did not change, an interrupted
run resumes (BLD from its checkpoint, scoring from its finished layers), and changing only the
budget re-solves without retraining.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from puzzle.io import atomic_write_json
from puzzle.search.compare import stage_baselines
from puzzle.search.config import SearchConfig
from puzzle.search.stages import StageResult, key_sha256, run_stage

log = logging.getLogger(__name__)

STAGES = ("library", "bld", "score", "profile", "solve", "fuse", "gkd", "export", "evaluate")
SHAREABLE = ("library", "bld", "score", "profile")
"""Stages that do not depend on the speedup / throughput / memory budget: runs may share them (``shared_dir``)."""


@dataclass
class SearchRun:
    directory: Path
    config: SearchConfig
    stages: dict[str, StageResult] = field(default_factory=dict)

    @property
    def export_dir(self) -> Path:
        return Path(self.stages["export"].outputs["model"])

    @property
    def report(self) -> pd.DataFrame:
        return pd.read_csv(self.directory / "report.csv")


class _Context:
    """Lazily loaded shared objects (parent, tokenizer) and the stage results so far."""

    def __init__(self, cfg: SearchConfig, run_dir: Path, progress: bool) -> None:
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress
        self.results: dict[str, StageResult] = {}
        self._parent: Any = None
        self._tokenizer: Any = None

    @property
    def source(self) -> Any:
        from puzzle.loading import resolve_source

        return resolve_source(self.cfg.model)

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
        return self.results[stage].key_sha256

    def out(self, stage: str, name: str) -> Any:
        return self.results[stage].outputs[name]


def _scenarios(cfg: SearchConfig) -> list[Any]:
    from puzzle.profiler.scenario import Scenario

    return [Scenario(name="prefill", phase="prefill", batch=1, length=cfg.context),
            Scenario(name="decode", phase="decode", batch=cfg.batch, length=cfg.context)]


def _library_config(cfg: SearchConfig) -> Any:
    from block_library import LibraryConfig
    from puzzle.data.config import DataConfig

    steps = max(1, cfg.bld_tokens // (8 * 256))
    return LibraryConfig(data=DataConfig(sources=cfg.data)).with_bld(
        tokens=cfg.bld_tokens, checkpoint_every=max(1, steps // 4))


# ------------------------------------------------------------------------------------------- stages


def _resume_or_restart(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a resumable stage function; if its directory holds work of other inputs (an earlier key of
    this stage, interrupted), start it over: the stage key, not the old files, decides what is valid."""
    from puzzle.errors import StaleArtifactError

    try:
        return fn(*args, **kwargs)
    except StaleArtifactError as e:
        log.info("%s; starting it over", e)
        return fn(*args, force=True, **kwargs)


def stage_library(ctx: _Context, d: Path) -> dict[str, Any]:
    from block_library import build_library, is_library

    lib = d / "lib"
    if not is_library(lib):  # the build is atomic: absent or complete
        build_library(ctx.cfg.model, lib, _library_config(ctx.cfg), progress=ctx.progress, overwrite=True)
    return {"library": str(lib)}


def stage_bld(ctx: _Context, d: Path) -> dict[str, Any]:
    from block_library import train_library

    lib = ctx.out("library", "library")
    train_library(lib, config=_library_config(ctx.cfg), progress=ctx.progress)
    return {"library": lib, "tokens": ctx.cfg.bld_tokens}


def stage_score(ctx: _Context, d: Path) -> dict[str, Any]:
    from puzzle.scoring import ScoreConfig, score_library

    cfg = ScoreConfig(sources=ctx.cfg.data, seq_len=ctx.cfg.score_seq_len, num_sequences=ctx.cfg.score_sequences)
    result = _resume_or_restart(score_library, ctx.out("bld", "library"), d / "scores", cfg, progress=ctx.progress)
    return {"scores": str(result.directory / "scores.csv"), "rows": len(result.scores)}


def search_target(cfg: SearchConfig, profile_dir: Path) -> Any:
    """The costing target of a run: ``cfg.budget``, with this machine's fitted efficiencies when it calibrates."""
    from puzzle.profiler.calibrate import calibrate_target
    from puzzle.profiler.hardware import parse_target

    target = parse_target(cfg.budget, dtype=cfg.dtype)
    path = Path(profile_dir) / "calibration.json"
    if cfg.calibrate and path.is_file():
        target = calibrate_target(target, None, (), (), measure=False, calibration=path)
    return target


def stage_profile(ctx: _Context, d: Path) -> dict[str, Any]:
    from puzzle.io import atomic_write_text
    from puzzle.profiler.calibrate import calibrate_target
    from puzzle.profiler.counts import ModelShape
    from puzzle.profiler.hardware import parse_target
    from puzzle.profiler.table import cost_table, layer_candidates, model_totals

    target = parse_target(ctx.cfg.budget, dtype=ctx.cfg.dtype)
    config, candidates = layer_candidates(ctx.out("bld", "library"))
    shape = ModelShape.from_config(config)
    if ctx.cfg.calibrate:  # time this machine's variants in the run's scenarios; the fit lands in d
        target = calibrate_target(target, shape, candidates, _scenarios(ctx.cfg), measure=True,
                                  calibration=d / "calibration.json")
    table = cost_table(shape, candidates, config.blocks, target=target, scenarios=_scenarios(ctx.cfg))
    atomic_write_text(d / "costs.csv", table.to_csv(index=False))
    return {"costs": str(d / "costs.csv"), "target": target.name, "calibrated": bool(ctx.cfg.calibrate),
            "parent": model_totals(table, config.blocks, _scenarios(ctx.cfg))}


def solve_problem(ctx: _Context, *, constraints: bool = True) -> Any:
    """The run's MIP: scores (KL) and costs of every library variant, the budget, the custom constraints."""
    from puzzle.cli.solve_cmd import _puzzle_errors
    from solvers import Budget, Scenario
    from solvers.io import problem_from_tables
    from solvers.parse import parse_constraint

    cfg = ctx.cfg
    budget = Budget(speedup=cfg.speedup, throughput=cfg.throughput,
                    memory_bytes=None if cfg.memory is None else cfg.memory * 2**30)
    with _puzzle_errors():
        return problem_from_tables(pd.read_csv(ctx.out("score", "scores")), pd.read_csv(ctx.out("profile", "costs")),
                                   score_column="kl", budget=budget,
                                   scenario=Scenario(name=cfg.scenario, batch=cfg.batch, context=cfg.context),
                                   constraints=[parse_constraint(c) for c in cfg.constraints] if constraints else [])


def stage_solve(ctx: _Context, d: Path) -> dict[str, Any]:
    from puzzle.cli.solve_cmd import _puzzle_errors
    from puzzle.schema import blocks_from_list, save_blocks
    from solvers import solve
    from solvers.io import write_json

    problem = solve_problem(ctx)
    with _puzzle_errors():
        solution = solve(problem, backend=ctx.cfg.solver)
    write_json(d / "solution.json", solution.to_dict())
    blocks = blocks_from_list(solution.block_configs())
    save_blocks(blocks, d / "blocks.json")
    log.info("MIP: %s", solution.summary())
    return {"blocks": str(d / "blocks.json"), "totals": solution.totals.to_dict(), "objective": solution.objective}


def stage_fuse(ctx: _Context, d: Path) -> dict[str, Any]:
    from block_library import open_library
    from puzzle.fusion import FusionConfig, fuse_and_report
    from puzzle.fusion.artifact import write_fusion
    from puzzle.schema import load_blocks

    cfg = ctx.cfg
    child = open_library(ctx.out("bld", "library")).assemble(load_blocks(ctx.out("solve", "blocks")))
    if cfg.fuse_threshold == 0:  # fusion off: the MIP's child goes on as it is
        from puzzle.loading import save_runtime

        save_runtime(child, d / "child", overwrite=True)
        return {"model": str(d / "child"), "segments": []}
    fcfg = FusionConfig(threshold=cfg.fuse_threshold, sources=cfg.data, calib_sequences=cfg.fuse_sequences,
                        eval_sequences=cfg.fuse_sequences, distill_steps=cfg.fuse_distill_steps,
                        targets=(cfg.budget,), dtype=cfg.dtype or "bf16", measure=False)
    result = fuse_and_report(child, ctx.tokenizer, fcfg, parent=ctx.parent, progress=ctx.progress)
    write_fusion(result, d / "fusion", config=fcfg, source=cfg.model, source_dir=ctx.source.directory, overwrite=True)
    return {"model": str(d / "fusion" / "model"), "segments": [s.label for s in result.segments]}


def stage_gkd(ctx: _Context, d: Path) -> dict[str, Any]:
    from puzzle.distill import GKDConfig, distill_child
    from puzzle.loading import load_model, save_runtime

    cfg = ctx.cfg
    child = load_model(ctx.out("fuse", "model"))
    if cfg.gkd_steps == 0:
        save_runtime(child, d / "child", overwrite=True)
        return {"model": str(d / "child"), "steps": 0}
    gcfg = GKDConfig(sources=cfg.data, steps=cfg.gkd_steps, batch=cfg.gkd_batch, seed=cfg.seed)
    result = _resume_or_restart(distill_child, child, ctx.parent, ctx.tokenizer, d / "gkd", gcfg, progress=ctx.progress)
    save_runtime(result.model, d / "child", overwrite=True)
    return {"model": str(d / "child"), "steps": cfg.gkd_steps, "initial": result.initial, "final": result.final}


def stage_export(ctx: _Context, d: Path) -> dict[str, Any]:
    from puzzle.export import export_decilm
    from puzzle.loading import load_model

    child = load_model(ctx.out("gkd", "model"))
    export_decilm(child, d / "model", source_dir=ctx.source.directory, overwrite=True)
    return {"model": str(d / "model"), "layers": child.config.num_hidden_layers}


def stage_evaluate(ctx: _Context, d: Path) -> dict[str, Any]:
    from puzzle.evaluation import evaluate
    from puzzle.loading import load_model

    cfg = ctx.cfg
    child = load_model(ctx.out("export", "model"))
    ev = evaluate(child, ctx.tokenizer, parent=ctx.parent, sources=cfg.data, num_sequences=cfg.eval_sequences,
                  speed=cfg.measure_speed, scenarios=_scenarios(cfg))
    atomic_write_json(d / "evaluation.json", ev.to_dict())
    return {"evaluation": str(d / "evaluation.json"), **{k: v for k, v in ev.to_dict().items() if k != "tasks"}}


STAGE_FUNCTIONS: dict[str, Callable[[_Context, Path], dict[str, Any]]] = {
    "library": stage_library, "bld": stage_bld, "score": stage_score, "profile": stage_profile,
    "solve": stage_solve, "fuse": stage_fuse, "gkd": stage_gkd, "export": stage_export, "evaluate": stage_evaluate,
    "baselines": stage_baselines,
}


def _keys(ctx: _Context, stage: str) -> dict[str, Any]:
    """What ``stage``'s result depends on: its settings and the keys of the stages it reads."""
    from block_library.session import parent_fingerprint

    c = ctx.cfg
    if stage == "library":
        return {"parent": parent_fingerprint(ctx.source), "library": _library_config(c).sha256("space", "data")}
    if stage == "bld":
        return {"library": ctx.sha("library"), "bld": _library_config(c).sha256()}
    if stage == "score":
        return {"bld": ctx.sha("bld"), "data": list(c.data), "seq_len": c.score_seq_len, "sequences": c.score_sequences}
    if stage == "profile":
        return {"library": ctx.sha("library"), "budget": c.budget, "dtype": c.dtype, "batch": c.batch, "context": c.context,
                "calibrate": c.calibrate}
    if stage == "solve":
        return {"score": ctx.sha("score"), "profile": ctx.sha("profile"), "speedup": c.speedup,
                "throughput": c.throughput, "memory": c.memory, "scenario": c.scenario, "solver": c.solver,
                "constraints": list(c.constraints)}
    if stage == "fuse":
        return {"solve": ctx.sha("solve"), "threshold": c.fuse_threshold, "sequences": c.fuse_sequences,
                "distill": c.fuse_distill_steps}
    if stage == "gkd":
        return {"fuse": ctx.sha("fuse"), "steps": c.gkd_steps, "batch": c.gkd_batch, "seed": c.seed}
    if stage == "export":
        return {"gkd": ctx.sha("gkd")}
    if stage == "evaluate":
        return {"export": ctx.sha("export"), "sequences": c.eval_sequences, "speed": c.measure_speed}
    # baselines: the same budget on the same costs, the same GKD and evaluation; the puzzle child to time against
    return {"bld": ctx.sha("bld"), "profile": ctx.sha("profile"), "evaluate": ctx.sha("evaluate"),
            "names": list(c.baselines), "speedup": c.speedup, "throughput": c.throughput, "memory": c.memory,
            "scenario": c.scenario, "gkd": [c.gkd_steps, c.gkd_batch, c.seed], "speed": c.measure_speed}


def search(cfg: SearchConfig, run_dir: str | Path, *, progress: bool = True,
           echo: Callable[[str], None] | None = None, shared_dir: str | Path | None = None) -> SearchRun:
    """Run (or resume) every stage of a search in ``run_dir``; see the module docstring.

    ``shared_dir``: where the budget-independent stages (:data:`SHAREABLE`: library, BLD, scores,
    costs) live, so several runs at different budgets train once (default: ``run_dir``).
    """
    from puzzle.profiler.hardware import parse_target
    from puzzle.search.report import write_report

    parse_target(cfg.budget, dtype=cfg.dtype)  # a misspelled budget fails now, not after BLD and scoring
    run_dir = Path(run_dir).resolve()  # manifests record absolute paths: valid from any working directory
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "run.json", {"config": cfg.to_dict(), "config_sha256": key_sha256(cfg.to_dict())})
    shared = Path(shared_dir).resolve() if shared_dir is not None else run_dir
    ctx = _Context(cfg, run_dir, progress)
    run = SearchRun(directory=run_dir, config=cfg)
    stages = STAGES + (("baselines",) if cfg.baselines else ())
    for k, stage in enumerate(stages, start=1):
        fn = STAGE_FUNCTIONS[stage]
        where = shared if stage in SHAREABLE else run_dir
        result = run_stage(where, stage, _keys(ctx, stage), lambda d, fn=fn: fn(ctx, d))
        ctx.results[stage] = run.stages[stage] = result
        if echo is not None:
            what = "up to date, skipped" if result.skipped else f"done in {result.seconds:.0f} s"
            echo(f"[{k}/{len(stages)}] {stage}: {what}")
    write_report(run, ctx)
    return run
