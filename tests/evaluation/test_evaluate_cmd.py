"""`puzzle evaluate` on a tiny parent with SmolLM2's tokenizer, and on a real SmolLM2."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch

from puzzle.cli.main import main
from puzzle.evaluation import evaluate
from puzzle.loading import load_model, save_runtime
from tests.conftest import requires_smollm2
from tests.evaluation.test_tasks import EXAMPLE

SPEED = ["--speed", "--scenario", "prefill:batch=1,prompt=16", "decode:batch=2,context=16"]


@pytest.mark.slow  # about 15 s
def test_cli_model_against_itself(tiny_text_parent, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", str(tiny_text_parent), "--parent", str(tiny_text_parent), "--sequences", "2",
            "--seq-len", "32", "--tasks", str(EXAMPLE), "--out", str(out), "--no-progress"]
    assert main(argv + SPEED) == 0
    printed = capsys.readouterr().out
    assert "KL(parent||model)" in printed and "python_stdlib_mc" in printed and "tokens_per_s" in printed
    data = json.loads((out / "evaluation.json").read_text())
    q = data["quality"]
    assert q["kl"] == 0.0 and q["top1_agreement"] == 1.0 and q["tokens"] == 2 * 31
    assert math.isfinite(q["ppl"]) and q["ppl"] > 1
    assert data["data"] == {"sources": ["stdlib"], "split": "validation", "seq_len": 32, "sequences": 2}
    task = data["tasks"]["python_stdlib_mc"]
    assert task["questions"] == 22 and 0 <= task["accuracy"] <= 1 and task["parent_accuracy"] == task["accuracy"]
    speed = pd.read_csv(out / "speed.csv")
    assert list(speed.model) == ["model", "model"] and (speed.ms > 0).all()  # itself: timed once
    assert (speed.speedup == 1.0).all() and (speed.device == "cpu").all()


def test_cli_child_without_tokenizer_against_parent(tiny_text_parent, tmp_path, capsys):
    child = copy.deepcopy(load_model(tiny_text_parent))
    with torch.no_grad():
        child.model.layers[1].mlp.up_proj.weight.mul_(1.5)
    save_runtime(child, tmp_path / "child")  # no tokenizer files: the parent's are used
    out = tmp_path / "eval"
    argv = ["evaluate", str(tmp_path / "child"), "--parent", str(tiny_text_parent), "--sequences", "2",
            "--seq-len", "32", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    data = json.loads((out / "evaluation.json").read_text())
    q = data["quality"]
    assert q["kl"] > 0 and q["nll"] - q["parent_nll"] == pytest.approx(q["loss_delta"], abs=1e-9)
    assert data["speed"] is None and not (out / "speed.csv").exists()


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "no/such/tasks.jsonl"], "task file no/such/tasks.jsonl does not exist"),
    (["--scenario", "sideways:batch=2"], "cannot read scenario 'sideways:batch=2'"),
])
def test_cli_bad_input_is_one_line(tiny_llama_dir, capsys, extra, message):
    assert main(["evaluate", str(tiny_llama_dir)] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("puzzle evaluate: error:") and message in err and "\n" not in err


@requires_smollm2
def test_smollm2_against_itself_and_on_the_example_tasks(smollm2, smollm2_tokenizer):
    ev = evaluate(smollm2, smollm2_tokenizer, parent=smollm2, seq_len=64, num_sequences=2, tasks=[EXAMPLE])
    q = ev.quality
    assert q["kl"] == 0.0 and q["top1_agreement"] == 1.0 and q["tokens"] == 2 * 63
    assert math.isfinite(q["ppl"]) and 1 < q["ppl"] < 100
    task = ev.tasks["python_stdlib_mc"]
    # measured: 11 of 22 (0.50) by summed log-prob, 9 of 22 per token; chance is 0.25
    assert 0.35 <= task["accuracy"] <= 1 and 0 <= task["accuracy_norm"] <= 1
    assert "python_stdlib_mc" in ev.format()
