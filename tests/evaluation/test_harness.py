"""lm-evaluation-harness through ``puzzle evaluate --lm-eval``: the shipped local task scores a model as the project's
own multiple-choice scorer does (the same questions, the same summed log-probs), parent and child side by side, and
bad task names are refused before any model is loaded. Skipped without lm-eval (``pip install 'puzzle-nas[eval]'``)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("lm_eval")

from puzzle.cli.main import main  # noqa: E402
from puzzle.evaluation import evaluate_tasks  # noqa: E402
from puzzle.evaluation.harness import SHIPPED_TASK, harness_scores, side_by_side  # noqa: E402
from puzzle.loading import load_model, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ROOT / "examples" / "tasks" / "python_stdlib_mc.jsonl"


def test_side_by_side_gives_the_child_as_a_percentage_of_the_parent():
    table = side_by_side({"t": {"acc": 0.5, "acc_norm": 0.0}}, {"t": {"acc": 0.4, "acc_norm": 0.25}})
    assert table.to_dict("records")[0] == {"task": "t", "metric": "acc", "parent": 0.5, "child": 0.4,
                                           "child_pct": pytest.approx(80.0)}
    assert math.isnan(table.child_pct[1])  # the parent's 0: no percentage
    assert side_by_side(None, {"t": {"acc": 0.4}}).parent.isna().all()


def test_the_shipped_task_scores_as_the_projects_own_scorer(tiny_text_parent):
    model, tok = load_model(tiny_text_parent), load_tokenizer(tiny_text_parent)
    harness = harness_scores(model, tok, [SHIPPED_TASK], batch_size=4)[SHIPPED_TASK]
    own = evaluate_tasks(model, tok, [QUESTIONS])["python_stdlib_mc"]
    # lm-eval's acc: the choice with the largest summed log-prob of its tokens after the context, as ours
    assert harness["acc"] == pytest.approx(own["accuracy"], abs=1e-12)
    assert 0 <= harness["acc_norm"] <= 1 and set(harness) == {"acc", "acc_norm"}


def test_evaluate_lm_eval_writes_the_side_by_side_table(tiny_text_parent, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_text_parent), "--parent", str(tiny_text_parent), "--sequences", "1",
                 "--seq-len", "32", "--lm-eval", SHIPPED_TASK, "--lm-eval-limit", "8", "--out", str(out),
                 "--no-progress"]) == 0
    table = pd.read_csv(out / "lm_eval.csv")
    assert list(table.columns) == ["task", "metric", "parent", "child", "child_pct"]
    assert set(table.metric) == {"acc", "acc_norm"} and (table.task == SHIPPED_TASK).all()
    assert (table.parent == table.child).all() and (table.child_pct == 100.0).all()  # the parent against itself
    assert "lm-evaluation-harness" in capsys.readouterr().out


def test_an_unknown_task_is_refused_before_any_model_is_loaded(tmp_path, capsys):
    code = main(["evaluate", str(tmp_path / "no-such-model-dir"), "--lm-eval", "no_such_task_xyz"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no_such_task_xyz" in err[0], err
    code = main(["evaluate", "smollm2-135m", "--lm-eval", SHIPPED_TASK, "--lm-eval-include", str(tmp_path / "nope")])
    assert code == 2 and "--lm-eval-include" in capsys.readouterr().err
