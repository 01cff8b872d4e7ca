"""Quality by context length (issue 32): which contexts, how many rows each, the same numbers as one evaluation at
that length, ``puzzle evaluate --context``, and the report's by-context columns and plot."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch

from puzzle.cli.main import main
from puzzle.data.packing import load_sequences
from puzzle.errors import ConfigError
from puzzle.evaluation import evaluate, evaluate_quality
from puzzle.evaluation.contexts import (check_contexts, context_chunk, context_sequences, from_json, report_contexts,
                                        to_json)
from puzzle.loading import load_model, load_tokenizer, save_runtime


def test_report_contexts_add_twice_the_served_one_where_the_positions_reach():
    assert report_contexts(1024, 8192) == (256, 1024, 2048)
    assert report_contexts(1024, 1536) == (256, 1024)  # 2048 is past the parent's positions
    assert report_contexts(256, None) == (256, 512)
    assert report_contexts(128, 4096) == (128, 256)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        report_contexts(1, 4096)


def test_each_context_gets_about_the_same_tokens_and_two_rows_at_least():
    assert context_sequences((256, 1024, 2048), 16 * 256) == {256: 16, 1024: 4, 2048: 2}
    assert context_sequences((256, 1024, 2048), 4 * 256) == {256: 4, 1024: 2, 2048: 2}
    assert [context_chunk(c) for c in (128, 256, 512, 1024)] == [2, 2, 1, 1]


def test_check_contexts_names_the_limit():
    check_contexts([256, 2048], 2048)
    with pytest.raises(ConfigError, match=r"--context 4096: past the model's 2048 positions"):
        check_contexts([256, 4096], 2048)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        check_contexts([1], None)


def test_json_round_trip_keeps_int_contexts():
    by = {1024: {"kl": 0.5}, 256: {"kl": 0.25}}
    doc = json.loads(json.dumps(to_json(by)))
    assert list(doc) == ["256", "1024"] and from_json(doc) == by and from_json(None) == {}


def _perturbed_child(parent_dir, directory):
    child = copy.deepcopy(load_model(parent_dir))
    with torch.no_grad():
        child.model.layers[1].mlp.up_proj.weight.mul_(1.5)
        child.model.layers[2].self_attn.o_proj.weight.mul_(0.5)
    save_runtime(child, directory)
    return child


def test_each_context_is_one_evaluation_at_that_length(tiny_text_parent, tmp_path):
    parent, tok = load_model(tiny_text_parent), load_tokenizer(tiny_text_parent)
    child = _perturbed_child(tiny_text_parent, tmp_path / "child")
    ev = evaluate(child, tok, parent=parent, seq_len=32, num_sequences=4, contexts={32: 4, 96: 2, 192: 2})
    assert sorted(ev.contexts) == [32, 96, 192]
    assert ev.contexts[32] == {"context": 32, "sequences": 4, **ev.quality}  # the main evaluation, not redone
    for c, n in ((96, 2), (192, 2)):
        ids = load_sequences(["stdlib"], tok, seq_len=c, num_sequences=n, split="validation")
        alone = evaluate_quality(child, ids, parent=parent, chunk=1)
        got = ev.contexts[c]
        assert got["sequences"] == n and got["tokens"] == n * (c - 1)
        for k in ("kl", "ppl", "top1_agreement", "parent_ppl"):
            assert got[k] == pytest.approx(alone[k], rel=1e-6), k
        assert got["kl"] > 0
    assert ev.to_dict()["contexts"]["96"]["kl"] == ev.contexts[96]["kl"]
    assert "quality by context" in ev.format() and "192" in ev.format()


def test_cli_context_is_repeatable_and_checked_before_loading(tiny_text_parent, tmp_path, capsys):
    _perturbed_child(tiny_text_parent, tmp_path / "child")
    out = tmp_path / "eval"
    argv = ["evaluate", str(tmp_path / "child"), "--parent", str(tiny_text_parent), "--sequences", "2",
            "--seq-len", "32", "--context", "32", "--context", "128", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "quality by context" in printed
    doc = json.loads((out / "evaluation.json").read_text())
    assert set(doc["contexts"]) == {"32", "128"} and doc["contexts"]["128"]["sequences"] == 2
    assert doc["contexts"]["32"]["kl"] == doc["quality"]["kl"]
    limit = json.loads((tiny_text_parent / "config.json").read_text())["max_position_embeddings"]
    assert main(argv[:-3] + ["--context", str(limit + 1), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"past the model's {limit} positions" in err and "\n" not in err
    assert not (tmp_path / "no").exists()


def test_report_has_context_columns_and_plots_them(tmp_path):
    from puzzle.search.report import context_columns, plot_report

    df = pd.DataFrame({"model": ["parent", "child"], "params_m": [135.0, 100.0], "ppl": [3.0, 3.5],
                       "kl_to_parent": [0.0, 0.4], "kl_256": [0.0, 0.4], "kl_1024": [0.0, 0.46],
                       "kl_2048": [0.0, 0.5]})
    assert context_columns(df, "kl") == {256: "kl_256", 1024: "kl_1024", 2048: "kl_2048"}
    assert context_columns(df, "kl_to") == {}
    plot_report(df, tmp_path / "report.png", "t")
    assert (tmp_path / "report.png").stat().st_size > 10_000
