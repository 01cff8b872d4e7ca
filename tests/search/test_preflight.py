"""Preflight: every refusal is a typed one-line error, before any work and before any file is written."""

from __future__ import annotations

import json
import time

import pytest

from puzzle.cli.main import main
from puzzle.errors import ConfigError, InfeasibleBudgetError
from puzzle.search import SearchConfig, search


def _tree(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else None


def _refused(capsys, argv):
    """Run ``puzzle search ARGV``: exit 2, one stderr line, no traceback; return that line (the tiny parents'
    FFN widths are no multiples of 256, so only --engine transformers takes them)."""
    assert main(["search", "--no-progress", "--engine", "transformers", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_an_out_inside_the_parent_cache_writes_nothing_there(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(cache))
    err = _refused(capsys, ["--model", str(tiny_llama_dir), "--out", str(cache / "run")])
    assert "never write there" in err and _tree(cache) == []
    before = _tree(tiny_llama_dir)
    err = _refused(capsys, ["--model", str(tiny_llama_dir), "--out", str(tiny_llama_dir / "run")])
    assert "inside" in err and _tree(tiny_llama_dir) == before


def test_a_users_own_run_json_is_never_overwritten(tmp_path, tiny_llama_dir, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "run.json").write_text('{"my": "notes"}')
    err = _refused(capsys, ["--model", str(tiny_llama_dir), "--out", str(mine)])
    assert "holds files but no puzzle run" in err and "--force" in err
    assert (mine / "run.json").read_text() == '{"my": "notes"}' and _tree(mine) == ["run.json"]


@pytest.mark.parametrize("out, message", [("", "--out is empty"), ("FILE", "is a file")])
def test_an_empty_or_file_out_is_refused(out, message, tmp_path, tiny_llama_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    err = _refused(capsys, ["--model", str(tiny_llama_dir), "--out", out])
    assert message in err and _tree(tmp_path) == ["FILE"]


def test_a_yaml_type_error_is_one_line(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text('speedup: "fast"\n')
    err = _refused(capsys, ["--config", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "run")])
    assert "speedup must be a number, got 'fast'" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("speedup", ["100", "inf"])
def test_an_unreachable_speedup_is_refused_in_seconds(speedup, tmp_path, tiny_llama_dir, capsys):
    t0 = time.perf_counter()
    err = _refused(capsys, ["--model", str(tiny_llama_dir), "--speedup", speedup, "--out", str(tmp_path / "run")])
    assert time.perf_counter() - t0 < 30  # not after library, BLD and scoring
    assert f"speedup >= {float(speedup):g}x is infeasible: at most" in err and not (tmp_path / "run").exists()
    with pytest.raises(InfeasibleBudgetError, match="infeasible"):
        search(SearchConfig(model=str(tiny_llama_dir), speedup=float(speedup), engine="transformers"), tmp_path / "run2",
               progress=False)
    assert not (tmp_path / "run2").exists()


def test_a_missing_data_source_is_refused_before_any_write(tmp_path, tiny_llama_dir, capsys):
    err = _refused(capsys, ["--model", str(tiny_llama_dir), "--data", str(tmp_path / "nope.txt"),
                            "--out", str(tmp_path / "run")])
    assert "does not exist" in err and not (tmp_path / "run").exists()


def test_puzzle_plan_lists_every_stage_and_writes_nothing(tmp_path, tiny_llama_dir, capsys):
    argv = ["plan", "--json", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "run")]
    assert main(argv) == 2  # vLLM (the default engine) cannot load the parent's FFN width 96
    assert "vLLM cannot load this parent's own blocks" in capsys.readouterr().err
    assert main([*argv, "--engine", "transformers"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in doc["stages"]] == ["library", "bld", "score", "profile", "solve", "child_bld", "fuse", "gkd",
                                                    "export", "evaluate"]
    assert all(s["action"] == "run" for s in doc["stages"]) and doc["problem"] is None
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="inside"):
        search(SearchConfig(model=str(tiny_llama_dir), engine="transformers"), tiny_llama_dir / "x", progress=False)
