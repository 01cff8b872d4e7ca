"""``evaluate``: the exported child against the parent on held-out text (KL, perplexity, top-1 agreement) and,
where they fit a rank whole, their step times on this machine (and inside the serving engine when the
budget's device is this one).

    run/evaluate/evaluation.json   quality (at the quality context, and by context: 256, it, twice it), speed, the
                                   data it read
    run/evaluate/engine_speed.csv  parent and child timed inside the engine (cpu budgets with vLLM installed)

Under torchrun every rank holds its layers of one model at a time (:mod:`puzzle.evaluation.sharded`);
rank 0 times both whole if asked. The baselines are judged the same way (:meth:`quality`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.search.cluster import Cluster
from puzzle.search.context import StageContext
from puzzle.search.plan import Plan
from puzzle.search.resources import (SEQ_LEN, RankUse, Shapes, StageUse, base_bytes, device_kind, host_bytes,
                                     layer_range, one_rank, stage_use)
from puzzle.search.setting import Section
from puzzle.search.stages.base import Stage
from puzzle.search.stages.profile import ProfileSettings, costing_target

SPEED_SECONDS = 120.0
"""Planned time of timing the parent and the child on rank 0 of a GPU cluster."""
SPEED_STEPS = 16
"""Steps :func:`~puzzle.evaluation.speed.measure_speed` times per model and scenario (5 rounds of 2, warm-ups)."""
ENGINE_SECONDS = 60.0
"""Starting the serving engine (vLLM) once per model on the CPU, beside its timed steps."""


@dataclass(frozen=True)
class EvaluateSettings(Section):
    eval_sequences: int
    measure_speed: bool
    data: tuple[str, ...]
    engine: str
    quality_context: int
    """The headline figures' tokens per sequence (``eval_sequences`` of them)."""


class EvaluateStage(Stage):
    name, order = "evaluate", 100
    sections = (EvaluateSettings, ProfileSettings)
    sharded = True
    whole_parent = True

    def key(self, plan: Plan, upstream: Mapping[str, str]) -> dict[str, Any]:
        s = EvaluateSettings.of(plan)
        return {"export": upstream["export"], "sequences": s.eval_sequences, "speed": s.measure_speed,
                "scenarios": [sc.to_dict() for sc in plan.scenarios],
                "contexts": {str(c): n for c, n in quality_contexts(plan).items()}}

    def quality(self, ctx: StageContext, model: Any) -> dict[str, Any]:
        """One process: ``model``'s quality against the parent, as the child's evaluation measures it."""
        from puzzle.evaluation import evaluate

        s = EvaluateSettings.of(ctx.plan)
        return evaluate(model, ctx.tokenizer, parent=ctx.parent, sources=s.data, seq_len=s.quality_context,
                        num_sequences=s.eval_sequences).quality

    def run(self, ctx: StageContext, directory: Path) -> dict[str, Any]:
        from puzzle.evaluation import Evaluation, evaluate, evaluate_sharded, measure_speed
        from puzzle.evaluation.contexts import context_chunk
        from puzzle.evaluation.engine_speed import ENGINES_TIMED, engine_available
        from puzzle.io import atomic_write_json, atomic_write_text
        from puzzle.loading import load_model

        s, plan, model = EvaluateSettings.of(ctx.plan), ctx.plan, ctx.out("export", "model")
        contexts = quality_contexts(plan)
        if ctx.world > 1:  # every rank holds its layers of one model at a time; rank 0 times them whole if asked
            by_context = {}
            for c, n in contexts.items():
                q = evaluate_sharded(model, ctx.source.directory, ctx.tokenizer, sources=s.data, seq_len=c,
                                     num_sequences=n, chunk=context_chunk(c), progress=ctx.progress)
                by_context[c] = {"context": c, "sequences": n, **q}
            quality = {k: v for k, v in by_context[s.quality_context].items() if k not in ("context", "sequences")}
            data = {"sources": list(s.data), "split": "validation", "seq_len": s.quality_context,
                    "sequences": s.eval_sequences}
            if not ctx.first:
                return {}
            speed = None
            if s.measure_speed:
                speed = measure_speed({"parent": ctx.parent, "model": load_model(model)}, list(plan.scenarios))
            ev = Evaluation(quality=quality, tasks={}, speed=speed, data=data, contexts=by_context)
        else:
            ev = evaluate(load_model(model), ctx.tokenizer, parent=ctx.parent, sources=s.data,
                          seq_len=s.quality_context, num_sequences=s.eval_sequences, speed=s.measure_speed,
                          scenarios=list(plan.scenarios),
                          contexts=contexts, progress=ctx.progress)
        doc = ev.to_dict()
        if s.measure_speed and plan.target.is_cpu and s.engine in ENGINES_TIMED and engine_available(s.engine):
            # the budget's device is this one: time parent and child inside the engine too, beside the prediction
            from puzzle.evaluation.engine_speed import engine_speed

            table = engine_speed(model, ctx.source.directory, list(plan.scenarios), engine=s.engine,
                                 target=costing_target(plan, Path(ctx.out("profile", "costs")).parent),
                                 progress=ctx.progress)
            atomic_write_text(directory / "engine_speed.csv", table.to_csv(index=False))
            doc["engine_speed"] = table.to_dict("records")
        atomic_write_json(directory / "evaluation.json", doc)
        return {"evaluation": str(directory / "evaluation.json"), **{k: v for k, v in doc.items() if k != "tasks"}}

    def resources(self, plan: Plan, cluster: Cluster, shapes: Shapes) -> StageUse:
        from block_library.distributed import split_layers
        from puzzle.evaluation.contexts import context_chunk
        from puzzle.evaluation.memory import evaluate_rank_bytes, layer_params

        s, config, sizes = EvaluateSettings.of(plan), shapes.parent, shapes.layers
        child, C = shapes.child_config, shapes.child_params
        P, world = shapes.parent_params, min(cluster.count, len(sizes), child.num_hidden_layers)
        seconds, timing = evaluate_seconds(plan, cluster, shapes, world)
        contexts = quality_contexts(plan)
        longest = max(contexts)
        if world == 1:  # the log-prob buffers of a chunk: context_chunk keeps them at 2 x 256 positions or one row
            positions = max(2 * SEQ_LEN, longest * context_chunk(longest)) / (2 * SEQ_LEN)
            peak = base_bytes(cluster) + (P + C) * 4 + 5 * 256 * config.vocab_size * 4 * positions
            return stage_use(self.name, f"one process: parent and child whole, at {_contexts_text(contexts)} tokens",
                             one_rank(cluster, device=peak, layers=(0, len(sizes)), seconds=seconds + timing), cluster)
        ranges, child_ranges = split_layers(layer_params(config), world), split_layers(layer_params(child), world)
        out = []
        for rank, (layers, child_layers) in enumerate(zip(ranges, child_ranges)):
            peak = max(evaluate_rank_bytes(config, child, layers, child_layers, first=rank == 0,
                                           last=rank == world - 1, chunk=context_chunk(c), seq_len=c, num_sequences=n,
                                           dtype_bytes=4, device=device_kind(cluster)) for c, n in contexts.items())
            if rank == 0 and s.measure_speed:
                peak = max(peak, base_bytes(cluster) + (P + C) * 4)  # parent and child whole on rank 0, timed
            staged = 4 * sum(sizes[l].parent_params for l in layers)
            out.append(RankUse(rank, layer_range(layers), peak, host_bytes(cluster, peak, staged), 0.0,
                               seconds + (timing if rank == 0 else 0.0)))
        how = (f"layers split over ranks, the parent's then the child's, at {_contexts_text(contexts)} tokens"
               + (", rank 0 times both whole" if s.measure_speed else ""))
        return stage_use(self.name, how, out, cluster)


def evaluate_seconds(plan: Plan, cluster: Cluster, shapes: Shapes, world: int) -> tuple[float, float]:
    """``(quality, speed)``: the parent's and the child's forwards over the evaluation's sequences in chunks of 2
    (layer-sharded: passed rank to rank) with the head and the metrics; timing both in every scenario on rank 0
    (:data:`SPEED_STEPS` steps each) and, when the budget is this CPU, inside the engine too."""
    from block_library.distributed import split_layers
    from puzzle.evaluation.contexts import context_chunk
    from puzzle.evaluation.engine_speed import ENGINES_TIMED, engine_available
    from puzzle.evaluation.memory import layer_params
    from puzzle.profiler.counts import ModelShape
    from puzzle.profiler.roofline import model_ms
    from puzzle.search.timing import VOCAB_METRIC, batches, pipeline, rank_clock

    s, clock = EvaluateSettings.of(plan), rank_clock(cluster, shapes.parent)
    quality = 0.0
    for c, n in quality_contexts(plan).items():
        b, m = batches(n, context_chunk(c))
        for config in (shapes.parent, shapes.child_config):
            ranges = split_layers(layer_params(config), max(1, min(world, len(config.blocks))))
            quality += pipeline([clock.blocks([config.blocks[l] for l in r], b, c) for r in ranges], m)
            quality += m * clock.head(b * (c - 1), VOCAB_METRIC)
    if not s.measure_speed:
        return quality, 0.0
    if clock.target is None:
        return quality, SPEED_SECONDS
    shape = ModelShape.from_config(shapes.parent)
    steps = sum(model_ms(shape, config.blocks, sc, clock.target) for config in (shapes.parent, shapes.child_config)
                for sc in plan.scenarios) / 1e3
    timed = plan.target.is_cpu and s.engine in ENGINES_TIMED and engine_available(s.engine)
    engine = 2 * ENGINE_SECONDS + steps * SPEED_STEPS if timed else 0.0
    return quality, steps * SPEED_STEPS + engine


def quality_contexts(plan: Plan) -> dict[int, int]:
    """``{tokens: sequences}`` the evaluation measures quality at: the quality context (``eval_sequences`` rows;
    by default the budget scenario's length, decode's KV cache), 256 and twice the quality context where the
    parent's positions reach, each with about as many tokens (:mod:`puzzle.evaluation.contexts`)."""
    from puzzle.evaluation.contexts import context_sequences, report_contexts

    s = EvaluateSettings.of(plan)
    limit = getattr(plan.parent_config, "max_position_embeddings", None)
    contexts = report_contexts(s.quality_context, limit)
    return {**context_sequences(contexts, s.eval_sequences * s.quality_context), s.quality_context: s.eval_sequences}


def _contexts_text(contexts: Mapping[int, int]) -> str:
    return ", ".join(f"{n} x {c}" for c, n in sorted(contexts.items()))


STAGE = EvaluateStage()
