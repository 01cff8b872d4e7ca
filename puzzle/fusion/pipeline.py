"""The fusion stage: detect runs, measure dependencies, choose segments, fuse, evaluate, report.

    from puzzle.fusion import FusionConfig, fuse_and_report
    result = fuse_and_report(model, tokenizer, FusionConfig(threshold=0.1))
    result.segments        # the fused segments, e.g. [Segment(20, 24)]
    result.report          # one row per segment and an "all" row: dependency, KL, latency
    result.model           # the fused runtime model (export it with puzzle.export.export_decilm)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from puzzle.data.packing import load_sequences
from puzzle.errors import ConfigError
from puzzle.fusion.dependency import RunDependency, parallel_error, run_dependency, run_inputs
from puzzle.fusion.distill import distill_fused_block
from puzzle.fusion.evaluate import kl_to_reference, measured_ms, predicted_ms, reference_logprobs
from puzzle.fusion.fuse import fuse_model, sequential_reference
from puzzle.fusion.runs import SEGMENT_SCORES, Segment, check_segments, choose_segments, find_runs, fused_blocks, fused_width
from puzzle.model import PuzzleForCausalLM
from puzzle.profiler.hardware import DEFAULT_TARGET, Target, parse_target
from puzzle.profiler.scenario import Scenario, default_scenarios

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FusionConfig:
    """How runs are chosen, measured and reported."""

    threshold: float = 0.2
    """Largest segment score (pairwise dependency, a cosine distance) a fused segment may have."""
    score: str = "max"
    """Segment score: ``max`` of its pairwise dependencies (every pair; on SmolLM2 it ranks the KL of
    fusing a segment with Spearman 0.87) or their ``mean`` (the paper's run-level view; 0.42)."""
    max_width_mult: float | None = 8.0
    """Largest fused width as a multiple of the parent's FFN width (Nemotron-Ultra: 8); None: no limit."""
    max_segment_kl: float | None = 0.1
    """Measured guard: a chosen segment whose fusion alone costs more KL (to the unfused model, on the
    held-out data) than this is reported but not fused. None: no guard. (On SmolLM2 the dependency
    missed the last two layers: 28-29 at max dependency 0.10 cost KL 3.6.)"""
    segments: tuple[Segment, ...] | None = None
    """Fuse exactly these segments instead of choosing by threshold (dependencies are still reported;
    the KL guard does not apply)."""
    sources: tuple[str, ...] = ("stdlib",)
    """Corpus: its train split calibrates (dependency, distillation), its validation split evaluates."""
    seq_len: int = 256
    """Tokens per sequence."""
    calib_sequences: int = 8
    """Sequences for the dependency analysis and the optional distillation."""
    eval_sequences: int = 8
    """Held-out sequences for the KL of the fused model to the unfused one."""
    distill_steps: int = 0
    """Local distillation steps per fused block against its sequential run (0: none, exact fusion)."""
    distill_lr: float = 1e-4
    """Learning rate of that distillation."""
    targets: tuple[str | Target, ...] = (DEFAULT_TARGET,)
    """Targets whose latency the profiler predicts: strings for :func:`~puzzle.profiler.hardware.parse_target`
    (``cpu`` is this machine's roofline) or already resolved :class:`Target` objects (a search's plan), used
    as they are."""
    dtype: str = "bf16"
    """Serving dtype of the GPU targets (the cpu target always uses fp32)."""
    scenarios: tuple[Scenario, ...] = field(default_factory=lambda: tuple(default_scenarios()))
    """Serving steps to predict and measure."""
    measure: bool = True
    """Also measure the unfused and fused models' step time on this machine."""
    repeats: int = 10
    """Timing repeats per measured step (the fastest is kept)."""

    def __post_init__(self) -> None:
        if self.score not in SEGMENT_SCORES:
            raise ConfigError(f"score must be one of {SEGMENT_SCORES}, got {self.score!r}")
        if not self.threshold >= 0:
            raise ConfigError(f"threshold must be >= 0 (a cosine distance), got {self.threshold}")
        if self.max_segment_kl is not None and not self.max_segment_kl >= 0:
            raise ConfigError(f"max_segment_kl must be >= 0 or None, got {self.max_segment_kl}")
        if self.max_width_mult is not None and self.max_width_mult <= 0:
            raise ConfigError(f"max_width_mult must be positive or None, got {self.max_width_mult}")
        for name in ("seq_len", "calib_sequences", "eval_sequences", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distill_steps < 0:
            raise ConfigError(f"distill_steps must be >= 0, got {self.distill_steps}")


@dataclass
class FusionResult:
    model: PuzzleForCausalLM
    """The fused model (the input model is never modified)."""
    segments: list[Segment]
    """The fused segments, in layer order."""
    dependencies: list[RunDependency]
    """One matrix per maximal run."""
    report: pd.DataFrame
    """One row per fused segment and a final ``all`` row."""
    latency: pd.DataFrame
    """target, scenario, source (predicted | measured), unfused_ms, fused_ms, speedup."""
    distill_losses: dict[str, list[float]] = field(default_factory=dict)


def resolved_targets(cfg: FusionConfig, config: Any = None) -> list[tuple[str, Target]]:
    """``(label, target)`` per entry of ``cfg.targets``: strings are parsed here (GPU targets in
    :attr:`FusionConfig.dtype`, the cpu target in its default fp32) and, given the model's ``config``, served at
    the tensor-parallel degree a search's plan would choose for it (the smallest that engines accept and that
    fits, the other GPUs serving replicas); Target objects are kept as they are."""
    out = []
    for t in cfg.targets:
        if isinstance(t, Target):
            out.append((t.name.rsplit(":", 1)[0], t))
            continue
        target = parse_target(t)
        target = target if target.is_cpu else replace(target, dtype=cfg.dtype)
        if config is not None:
            from puzzle.profiler.counts import ModelShape
            from puzzle.profiler.deployment import choose_tensor_parallel

            largest = max(cfg.scenarios, key=lambda sc: sc.batch * sc.kv_tokens)
            target = choose_tensor_parallel(target, ModelShape.from_config(config), config.blocks,
                                            batch=largest.batch, kv_tokens=largest.kv_tokens)
        out.append((t, target))
    return out


def predicted_latency_rows(unfused: Any, fused: Any, cfg: FusionConfig) -> list[dict[str, Any]]:
    """Predicted step ms of the unfused and the fused architecture (configs) per target and scenario."""
    rows = []
    for text, target in resolved_targets(cfg, unfused):  # the fused model is served as the unfused one
        before = predicted_ms(unfused, unfused.blocks, cfg.scenarios, target)
        after = predicted_ms(fused, fused.blocks, cfg.scenarios, target)
        for sc in cfg.scenarios:
            rows.append({"target": f"{text}:{target.dtype}", "scenario": sc.name, "source": "predicted",
                         "unfused_ms": before[sc.name], "fused_ms": after[sc.name],
                         "speedup": before[sc.name] / after[sc.name]})
    return rows


def _latency_rows(unfused: PuzzleForCausalLM, fused: PuzzleForCausalLM, cfg: FusionConfig) -> list[dict[str, Any]]:
    rows = predicted_latency_rows(unfused.config, fused.config, cfg)
    if cfg.measure:
        device = next(unfused.parameters()).device
        before, after = measured_ms([unfused, fused], cfg.scenarios, repeats=cfg.repeats)
        for sc in cfg.scenarios:
            rows.append({"target": f"this {device.type}:{str(next(unfused.parameters()).dtype).removeprefix('torch.')}",
                         "scenario": sc.name, "source": "measured",
                         "unfused_ms": before[sc.name], "fused_ms": after[sc.name],
                         "speedup": before[sc.name] / after[sc.name]})
    return rows


def _segment_gain(config: Any, seg: Segment, cfg: FusionConfig) -> dict[str, float]:
    """Predicted ms saved per step by fusing this segment alone, per target and scenario."""
    blocks = config.blocks
    after, _ = fused_blocks(blocks, [seg])
    out = {}
    for text, target in resolved_targets(cfg, config):
        b, a = predicted_ms(config, blocks, cfg.scenarios, target), predicted_ms(config, after, cfg.scenarios, target)
        for sc in cfg.scenarios:
            out[f"{text}_{sc.name}_saved_ms"] = b[sc.name] - a[sc.name]
    return out


def choose_fused(config: Any, deps: Sequence[RunDependency], cfg: FusionConfig) -> list[Segment]:
    """The segments to fuse: ``cfg.segments`` (those of two or more layers) or, per run, the fewest
    segments under the threshold and the width limit (:func:`~puzzle.fusion.runs.choose_segments`)."""
    blocks = config.blocks
    if cfg.segments is not None:  # one-layer segments are nothing to fuse
        return [s for s in check_segments(blocks, cfg.segments) if len(s) > 1]
    max_width = None if cfg.max_width_mult is None else int(cfg.max_width_mult * config.intermediate_size)
    out = []
    for d in deps:
        out += choose_segments(d.run, d.matrix, d.widths, threshold=cfg.threshold, max_width=max_width, how=cfg.score)
    return out


def segment_row(config: Any, seg: Segment, deps: Sequence[RunDependency], cfg: FusionConfig, *,
                parallel_error: float, quality: dict[str, float]) -> dict[str, Any]:
    """The report row of one chosen segment: its width, dependencies (from the matrix of the run that
    holds it), parallel error, the ``quality`` of fusing it alone (kl, loss_delta, top1_agreement
    against the unfused model), the predicted ms it saves, and whether the KL guard lets it be fused."""
    blocks = config.blocks
    dep = next((d for d in deps if d.run.start <= seg.start and seg.stop <= d.run.stop), None)
    matrix = dep.matrix if dep is not None else None
    lo = seg.start - dep.run.start if dep is not None else 0
    pairs = [matrix[i][j] for i in range(lo, lo + len(seg)) for j in range(i + 1, lo + len(seg))] if matrix else []
    row = {"segment": seg.label, "layers": len(seg), "width": fused_width(blocks, seg),
           "width_mult": fused_width(blocks, seg) / config.intermediate_size,
           "dependency": sum(pairs) / len(pairs) if pairs else float("nan"),
           "max_pair_dependency": max(pairs) if pairs else float("nan"),
           "parallel_error": parallel_error}
    row.update(quality)
    row.update(_segment_gain(config, seg, cfg))
    guard = cfg.max_segment_kl if cfg.segments is None else None
    row["fused"] = guard is None or row["kl"] <= guard
    if not row["fused"]:
        log.warning("segment %s: fusing it alone costs KL %.3g > max_segment_kl %.3g; left unfused",
                    seg.label, row["kl"], guard)
    return row


def model_rows(rows: list[dict[str, Any]], segments: Sequence[Segment], cfg: FusionConfig, *,
               unfused_to_parent: float | None, fused: dict[str, float],
               distilled: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """``rows`` (one per chosen segment) with the whole-model rows around them: ``unfused`` first (its
    ``kl_to_parent``, when a parent was given), then ``all`` (the ``fused`` quality of every fused
    segment together, and the ms they save) and ``all (distilled)`` when ``distilled`` is given."""
    nan = float("nan")
    blank = {"width": nan, "width_mult": nan, "dependency": nan, "max_pair_dependency": nan, "parallel_error": nan}
    out = list(rows)
    if unfused_to_parent is not None:
        out.insert(0, {"segment": "unfused", "layers": 0, **blank, "kl": 0.0, "loss_delta": 0.0,
                       "top1_agreement": 1.0, "kl_to_parent": unfused_to_parent})
    total = {"segment": "all", "layers": sum(len(s) for s in segments), **blank, **fused}
    for text, _ in resolved_targets(cfg):
        for sc in cfg.scenarios:
            key = f"{text}_{sc.name}_saved_ms"
            total[key] = sum(r.get(key, 0.0) for r in rows if r.get("fused"))
    out.append(total)
    if distilled is not None:
        out.append({**total, "segment": "all (distilled)", **distilled})
    return out


def fuse_and_report(model: PuzzleForCausalLM, tokenizer: Any, cfg: FusionConfig | None = None, *,
                    parent: PuzzleForCausalLM | None = None, progress: bool = True) -> FusionResult:
    """Run the whole fusion stage on ``model`` (not modified); see :class:`FusionConfig`.

    ``parent``: the model ``model`` was derived from; the ``all`` rows then also report
    ``kl_to_parent`` of the unfused and the fused model (KL before and after fusion).
    """
    cfg = cfg or FusionConfig()
    blocks = model.config.blocks
    runs = find_runs(blocks)
    if cfg.segments is not None:
        check_segments(blocks, cfg.segments)
    calib = load_sequences(list(cfg.sources), tokenizer, seq_len=cfg.seq_len, num_sequences=cfg.calib_sequences)
    heldout = load_sequences(list(cfg.sources), tokenizer, seq_len=cfg.seq_len, num_sequences=cfg.eval_sequences,
                             split="validation")
    starts = sorted({r.start for r in runs} | {s.start for s in (cfg.segments or ())})
    inputs = run_inputs(model, calib, starts) if starts else {}
    deps = [run_dependency(model, r, inputs[r.start]) for r in tqdm(runs, desc="dependency", disable=not progress)]
    segments = choose_fused(model.config, deps, cfg)
    if not runs:
        log.warning("no run of two or more attention-free SwiGLU layers: nothing to fuse")
    extra = sorted({s.start for s in segments} - set(inputs))
    if extra:
        inputs.update(run_inputs(model, calib, extra))
    reference = reference_logprobs(model, heldout)
    rows, losses = [], {}
    fused_all = model
    for seg in tqdm(segments, desc="fused segments", disable=not progress):
        err = parallel_error(model, seg, inputs[seg.start])
        one = fuse_model(model, [seg])
        rows.append(segment_row(model.config, seg, deps, cfg, parallel_error=err,
                                quality=kl_to_reference(one, heldout, reference)))
    segments = [s for s, r in zip(segments, rows) if r["fused"]]
    if segments:
        fused_all = fuse_model(model, segments)
    to_parent = reference_logprobs(parent, heldout) if parent is not None else None

    def quality(m: PuzzleForCausalLM) -> dict[str, float]:
        out = kl_to_reference(m, heldout, reference)
        if to_parent is not None:
            out["kl_to_parent"] = kl_to_reference(m, heldout, to_parent)["kl"]
        return out

    unfused_to_parent = kl_to_reference(model, heldout, to_parent)["kl"] if to_parent is not None else None
    fused_quality, distilled = quality(fused_all), None
    if segments and cfg.distill_steps:
        fused_all, losses = _distill(model, fused_all, segments, inputs, cfg, progress=progress)
        distilled = quality(fused_all)
    rows = model_rows(rows, segments, cfg, unfused_to_parent=unfused_to_parent, fused=fused_quality,
                      distilled=distilled)
    report = pd.DataFrame(rows)
    latency = pd.DataFrame(_latency_rows(model, fused_all, cfg))
    return FusionResult(model=fused_all, segments=segments, dependencies=deps, report=report, latency=latency,
                        distill_losses=losses)


def _distill(model: PuzzleForCausalLM, fused: PuzzleForCausalLM, segments: Sequence[Segment],
             inputs: dict[int, torch.Tensor], cfg: FusionConfig, *, progress: bool
             ) -> tuple[PuzzleForCausalLM, dict[str, list[float]]]:
    _, origin = fused_blocks(model.config.blocks, segments)
    losses = {}
    for seg in tqdm(segments, desc="distill fused blocks", disable=not progress):
        x0 = inputs[seg.start]
        with torch.no_grad():
            target = sequential_reference(model, seg, x0)
        block = fused.model.layers[origin.index(seg.start)]
        losses[seg.label] = distill_fused_block(block, x0, target, steps=cfg.distill_steps, lr=cfg.distill_lr)
    return fused, losses

