"""``puzzle search`` end to end on a tiny parent: every stage, rerun skips, a budget change
re-solves only, and a run killed mid-BLD resumes without redoing finished stages."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch

import block_library
from puzzle.loading import load_model
from puzzle.search import STAGES, SearchConfig, search

TINY = dict(budget="8xH100", speedup=1.2, bld_tokens=4 * 8 * 256, score_sequences=1, score_seq_len=32,
            fuse_sequences=1, fuse_distill_steps=2, gkd_steps=2, gkd_batch=1, eval_sequences=1, measure_speed=False)


@pytest.fixture(scope="module")
def finished_run(tiny_text_parent, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "run"
    lines: list[str] = []
    run = search(SearchConfig(model=str(tiny_text_parent), **TINY), out, progress=False, echo=lines.append)
    return run, lines


def test_every_stage_runs_and_the_export_loads(finished_run, tiny_text_parent):
    run, lines = finished_run
    assert [line.split(":")[0] for line in lines] == [f"[{k}/{len(STAGES)}] {s}" for k, s in enumerate(STAGES, 1)]
    child = load_model(run.export_dir)
    solution = json.loads((run.directory / "solve" / "solution.json").read_text())
    assert solution["totals"]["speedup"] >= 1.2 - 1e-9
    report = run.report.set_index("model")
    assert list(report.index) == ["parent", "child"]
    assert report.loc["child", "pred_decode_speedup"] > 1.0 and report.loc["child", "kl_to_parent"] > 0
    assert report.loc["child", "layers"] == child.config.num_hidden_layers
    assert (run.directory / "report.png").stat().st_size > 1000
    with torch.no_grad():
        assert torch.isfinite(child(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False).logits).all()


def test_rerun_skips_everything_and_a_new_budget_resolves_only(finished_run, tiny_text_parent):
    run, _ = finished_run
    lines: list[str] = []
    search(SearchConfig(model=str(tiny_text_parent), **TINY), run.directory, progress=False, echo=lines.append)
    assert all(line.endswith("skipped") for line in lines)
    lines.clear()
    search(SearchConfig(model=str(tiny_text_parent), **{**TINY, "speedup": 1.3}), run.directory, progress=False,
           echo=lines.append)
    skipped = [line.split()[1].rstrip(":") for line in lines if line.endswith("skipped")]
    assert skipped == ["library", "bld", "score", "profile"]


def test_killed_mid_bld_resumes_without_redoing_the_build(tiny_text_parent, tmp_path, monkeypatch, caplog):
    real = block_library.train_library

    def killed(*args, **kwargs):
        def on_step(step):
            if step == 2:
                raise KeyboardInterrupt  # as if the process were killed right after step 2's checkpoint
        return real(*args, **{**kwargs, "on_step": on_step})

    monkeypatch.setattr(block_library, "train_library", killed)
    cfg = SearchConfig(model=str(tiny_text_parent), **TINY)
    with pytest.raises(KeyboardInterrupt):
        search(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "library" / "stage.json").is_file()
    assert not (tmp_path / "run" / "bld" / "stage.json").exists()
    monkeypatch.setattr(block_library, "train_library", real)
    lines: list[str] = []
    with caplog.at_level(logging.INFO):
        search(cfg, tmp_path / "run", progress=False, echo=lines.append)
    assert lines[0].endswith("library: up to date, skipped")
    assert "resuming BLD at step 2" in caplog.text
    losses = pd.read_csv(tmp_path / "run" / "library" / "lib" / "bld" / "losses.csv")
    assert sorted(losses.step.unique()) == [1, 2, 3, 4]
