"""lm-evaluation-harness tasks on the parent and the child, side by side (``pip install puzzle-nas[eval]``).

    scores = harness_scores(model, tokenizer, ["python_stdlib_mc"])          # {task: {metric: value}}
    table = side_by_side(parent_scores, child_scores)                          # task, metric, parent, child, child_pct

The model runs through lm-eval's HF backend as the runtime model object itself (no export, no remote code); the
same settings for both models. Task names are lm-eval's (``arc_easy``, ``hellaswag``, ``mmlu``, ... fetch their
data sets from the hub) or those of YAML files in ``include`` directories. The project ships one local task,
:data:`SHIPPED_TASK`: the multiple-choice questions of ``examples/tasks/python_stdlib_mc.jsonl`` as an lm-eval
task (``acc`` and ``acc_norm``), so the path runs end to end offline, in CI too.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from puzzle.errors import ConfigError

SHIPPED_TASK = "python_stdlib_mc"
"""The local lm-eval task the project ships (always on the include path)."""
_QUESTIONS = Path(__file__).resolve().parents[2] / "examples" / "tasks" / "python_stdlib_mc.jsonl"
_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
COLUMNS = ["task", "metric", "parent", "child", "child_pct"]


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("--lm-eval needs lm-evaluation-harness: pip install 'puzzle-nas[eval]' "
                          "(or pip install lm-eval==0.4.13)") from None
    return lm_eval


def shipped_task_dir(directory: Path | None = None) -> Path:
    """Write :data:`SHIPPED_TASK`'s YAML (its data file named by absolute path) into ``directory`` (default: the
    puzzle cache's ``lm_eval_tasks``) and return the directory."""
    from puzzle.io import atomic_write_text
    from puzzle.parents.embedded import cache_root

    directory = directory or cache_root() / "lm_eval_tasks"
    directory.mkdir(parents=True, exist_ok=True)
    text = _YAML.format(task=SHIPPED_TASK, data=_QUESTIONS)
    path = directory / f"{SHIPPED_TASK}.yaml"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return directory


def check_tasks(tasks: Sequence[str], include: Sequence[str | Path] = ()) -> None:
    """Refuse, before any model is loaded, task names lm-eval does not know (with ``include`` and the shipped task)
    and include paths that are not directories."""
    for d in include:
        if not Path(d).expanduser().is_dir():
            raise ConfigError(f"--lm-eval-include {d}: not a directory of lm-eval task YAML files")
    manager = _task_manager(include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval does not know task(s) {', '.join(unknown)}: name lm-eval tasks (lm-eval ls "
                          f"tasks), {SHIPPED_TASK}, or YAML files in an --lm-eval-include directory")


def _task_manager(include: Sequence[str | Path]) -> Any:
    return _manager(tuple(str(Path(d).expanduser().resolve()) for d in include))


@functools.lru_cache(maxsize=4)
def _manager(include: tuple[str, ...]) -> Any:
    """lm-eval's task index (it reads every task YAML it has: seconds), once per include path."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(shipped_task_dir()), *include])


def harness_scores(model: Any, tokenizer: Any, tasks: Sequence[str], *, include: Sequence[str | Path] = (),
                   batch_size: int = 8, limit: int | None = None, num_fewshot: int | None = None
                   ) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of lm-eval's ``simple_evaluate`` on ``model`` (a runtime model: its HF backend),
    e.g. ``{"python_stdlib_mc": {"acc": 0.5, "acc_norm": 0.45}}``; standard errors are left out."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(next(model.parameters()).device))
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=_task_manager(include), limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False)
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            name, comma, _filter = key.partition(",")  # "acc,none": a metric and its filter; "sample_len": not one
            if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            scores.setdefault(task, {})[name] = float(value)
    return scores


def side_by_side(parent: Mapping[str, Mapping[str, float]] | None,
                 child: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """One row per task and metric: the parent's value, the child's, and the child's as a percentage of the
    parent's (NaN without a parent or where the parent's is 0)."""
    rows = []
    for task in sorted(child):
        for metric in sorted(child[task]):
            c = child[task][metric]
            p = (parent or {}).get(task, {}).get(metric, float("nan"))
            rows.append({"task": task, "metric": metric, "parent": p, "child": c,
                         "child_pct": 100.0 * c / p if p == p and p != 0 else float("nan")})
    return pd.DataFrame(rows, columns=COLUMNS)
