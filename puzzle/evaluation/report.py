"""One evaluation of a model: held-out quality, task accuracy and measured speed, with its parent beside it.

    ev = evaluate(child, tok, parent=parent, tasks=["examples/tasks/python_stdlib_mc.jsonl"], speed=True)
    print(ev.format())            # the text table `puzzle evaluate` prints
    ev.to_dict()                  # what evaluation.json holds; ev.speed is the speed.csv table
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from puzzle.data.packing import load_sequences
from puzzle.data.sources import source_names
from puzzle.evaluation.quality import evaluate_quality
from puzzle.evaluation.speed import measure_speed
from puzzle.evaluation.tasks import Question, evaluate_tasks, load_tasks
from puzzle.model import PuzzleForCausalLM
from puzzle.profiler.scenario import Scenario

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What :func:`evaluate` measured."""

    quality: dict[str, float]
    """Held-out metrics (:func:`evaluate_quality`): nll, ppl, tokens; kl, top1_agreement, ... with a parent."""
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    """{task: accuracy, accuracy_norm, questions, chance; parent_accuracy, parent_accuracy_norm with a parent}."""
    speed: pd.DataFrame | None = None
    """Measured speed rows (:func:`measure_speed`), or None when not measured."""
    data: dict[str, Any] = field(default_factory=dict)
    """How the held-out ids were made: sources, split, seq_len, sequences."""
    contexts: dict[int, dict[str, float]] = field(default_factory=dict)
    """Quality by context length (:mod:`puzzle.evaluation.contexts`): ``{tokens: quality + context, sequences}``."""

    def to_dict(self) -> dict[str, Any]:
        from puzzle.evaluation.contexts import to_json

        speed = None if self.speed is None else self.speed.to_dict(orient="records")
        return {"data": self.data, "quality": self.quality, "tasks": self.tasks, "speed": speed,
                "contexts": to_json(self.contexts)}

    def format(self) -> str:
        q, d = self.quality, self.data
        lines = [f"held-out quality: {d.get('sequences')} x {d.get('seq_len')} tokens of {d.get('sources')} "
                 f"({d.get('split')} split), {q['tokens']} next-token positions"]
        parent = "kl" in q
        cols = [q] + ([{"nll": q["parent_nll"], "ppl": q["parent_ppl"]}] if parent else [])
        lines.append(f"  {'':18}" + "".join(f"{name:>12}" for name in ("model", "parent")[:len(cols)]))
        lines.append(f"  {'nll (nats/token)':18}" + "".join(f"{c['nll']:>12.4f}" for c in cols))
        lines.append(f"  {'perplexity':18}" + "".join(f"{c['ppl']:>12.4g}" for c in cols))
        if parent:
            lines.append(f"  {'KL(parent||model)':18}{q['kl']:>12.4f} nats/token")
            lines.append(f"  {'loss delta':18}{q['loss_delta']:>+12.4f} nats/token")
            lines.append(f"  {'top-1 agreement':18}{q['top1_agreement']:>12.2%}")
        if self.contexts:
            lines.append("")
            lines.append(context_table(self.contexts))
        if self.tasks:
            lines.append("")
            lines.append(_tasks_table(self.tasks))
        if self.speed is not None:
            lines.append("")
            device = ", ".join(sorted(set(self.speed.device + " " + self.speed.dtype)))
            lines.append(f"measured speed on {device} (fastest of interleaved rounds)")
            table = self.speed[["scenario", "model", "batch", "length", "ms", "tokens_per_s", "speedup"]]
            lines.append(table.to_string(index=False, formatters={
                "ms": "{:.2f}".format, "tokens_per_s": "{:.1f}".format, "speedup": "{:.3f}x".format}))
        return "\n".join(lines)


def context_table(contexts: Mapping[int, Mapping[str, float]]) -> str:
    """Quality by context as text: one row per context length."""
    rows = []
    for c, q in sorted(contexts.items()):
        row = {"context": c, "sequences": int(q["sequences"]), "ppl": q["ppl"]}
        if "kl" in q:
            row.update(parent_ppl=q["parent_ppl"], kl=q["kl"], top1_agreement=q["top1_agreement"])
        rows.append(row)
    return "quality by context (tokens per sequence)\n" + pd.DataFrame(rows).to_string(
        index=False, float_format="{:.4f}".format)


def _tasks_table(tasks: Mapping[str, Mapping[str, float]]) -> str:
    rows = []
    for name, m in tasks.items():
        row = {"task": name, "questions": int(m["questions"]), "chance": m["chance"], "accuracy": m["accuracy"],
               "accuracy_norm": m["accuracy_norm"]}
        if "parent_accuracy" in m:
            row.update(parent_accuracy=m["parent_accuracy"], parent_accuracy_norm=m["parent_accuracy_norm"])
        rows.append(row)
    return pd.DataFrame(rows).to_string(index=False, float_format="{:.3f}".format)


def evaluate(model: PuzzleForCausalLM, tokenizer: Any, *, parent: PuzzleForCausalLM | None = None,
             sources: Sequence[str | os.PathLike[str]] | str = ("stdlib",), seq_len: int = 256,
             num_sequences: int = 8, tasks: Sequence[str | os.PathLike[str]] | Mapping[str, Sequence[Question]] = (),
             speed: bool = False, scenarios: Sequence[Scenario] | None = None, chunk: int = 2,
             contexts: Mapping[int, int] | None = None, progress: bool = False) -> Evaluation:
    """Quality on the validation split of ``sources``, accuracy on ``tasks`` (JSONL paths or
    :func:`load_tasks` output) and, with ``speed``, measured step times on ``scenarios``
    (default: prefill b1x1024, decode b8 ctx1024). ``parent`` adds the comparison columns.
    ``contexts`` (``{tokens: sequences}``) adds the quality at each context length
    (:func:`~puzzle.evaluation.contexts.quality_by_context`); ``seq_len`` among them is the main evaluation's."""
    from puzzle.evaluation.contexts import quality_by_context

    loaded = tasks if isinstance(tasks, Mapping) else load_tasks(tasks)  # bad task files fail before any work
    ids = load_sequences(sources, tokenizer, seq_len=seq_len, num_sequences=num_sequences, split="validation")
    data = {"sources": source_names(sources), "split": "validation", "seq_len": seq_len, "sequences": ids.shape[0]}
    quality = evaluate_quality(model, ids, parent=parent, chunk=chunk, progress=progress)
    others = {c: n for c, n in (contexts or {}).items() if (c, n) != (seq_len, num_sequences)}
    by_context = quality_by_context(model, tokenizer, parent=parent, sources=sources, sequences=others, chunk=chunk,
                                    progress=progress)
    if contexts and (seq_len, num_sequences) in contexts.items():
        by_context[seq_len] = {"context": seq_len, "sequences": int(ids.shape[0]), **quality}

    task_results = evaluate_tasks(model, tokenizer, loaded)
    if parent is not None and task_results:
        same = parent is model
        for name, m in (task_results if same else evaluate_tasks(parent, tokenizer, loaded)).items():
            task_results[name].update(parent_accuracy=m["accuracy"], parent_accuracy_norm=m["accuracy_norm"])

    table = None
    if speed:
        # the parent first: the speedup reference; a model compared with itself is timed once
        models = {"model": model} if parent is None or parent is model else {"parent": parent, "model": model}
        table = measure_speed(models, scenarios, progress=progress)
    return Evaluation(quality=quality, tasks=task_results, speed=table, data=data,
                      contexts=dict(sorted(by_context.items())))
