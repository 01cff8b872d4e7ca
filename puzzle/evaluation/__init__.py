"""Evaluation of a model, optionally against its parent (``puzzle evaluate``).

    from puzzle.evaluation import evaluate
    ev = evaluate(child, tokenizer, parent=parent, tasks=["examples/tasks/python_stdlib_mc.jsonl"], speed=True)
    ev.quality       # nll, ppl, tokens; kl, top1_agreement, loss_delta, parent_nll, parent_ppl
    ev.tasks         # {task: accuracy, accuracy_norm, questions, chance, parent_accuracy, ...}
    ev.speed         # model, scenario, ms, tokens_per_s, speedup (parent first), or None

Quality: :mod:`puzzle.evaluation.quality`; task files: :mod:`puzzle.evaluation.tasks`; speed:
:mod:`puzzle.evaluation.speed`. Quality from model directories with the layers split over the ranks
of ``torchrun``: :func:`evaluate_sharded` (:mod:`puzzle.evaluation.sharded`; its memory per rank:
:mod:`puzzle.evaluation.memory`).
"""

from puzzle.evaluation.quality import evaluate_quality
from puzzle.evaluation.report import Evaluation, evaluate
from puzzle.evaluation.sharded import evaluate_sharded
from puzzle.evaluation.speed import measure_speed
from puzzle.evaluation.tasks import Question, evaluate_tasks, load_tasks, read_task_file

__all__ = ["Evaluation", "Question", "evaluate", "evaluate_quality", "evaluate_sharded", "evaluate_tasks",
           "load_tasks", "measure_speed", "read_task_file"]
