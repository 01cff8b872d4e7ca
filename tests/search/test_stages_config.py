"""Stage manifests skip, rerun and refuse garbage; the search config mirrors the flags."""

from __future__ import annotations

import argparse

import pytest

from puzzle.cli.main import build_parser
from puzzle.cli.search_cmd import config_from_args
from puzzle.errors import ConfigError, CorruptArtifactError
from puzzle.search import SearchConfig
from puzzle.search.manifest import MANIFEST, run_stage


def test_a_stage_runs_once_per_key(tmp_path):
    calls = []

    def work(d):
        calls.append(d)
        (d / "out.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    a = run_stage(tmp_path, "s", {"x": 1}, work)
    b = run_stage(tmp_path, "s", {"x": 1}, work)
    assert (a.skipped, b.skipped, len(calls)) == (False, True, 1) and b.outputs == {"n": 1}
    c = run_stage(tmp_path, "s", {"x": 2}, work)
    assert not c.skipped and c.outputs == {"n": 2} and c.key_sha256 != a.key_sha256
    d = run_stage(tmp_path, "s", {"x": 3}, work, fresh=True)  # fresh: the old files are gone first
    assert d.outputs == {"n": 3} and (tmp_path / "s" / "out.txt").read_text() == "3"


def test_an_interrupted_stage_reruns_and_a_garbled_manifest_is_named(tmp_path):
    def boom(d):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "s", {"x": 1}, boom)
    assert not (tmp_path / "s" / MANIFEST).exists()  # never complete: the next run redoes it
    assert not run_stage(tmp_path, "s", {"x": 1}, lambda d: {}).skipped
    (tmp_path / "s" / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptArtifactError, match="delete"):
        run_stage(tmp_path, "s", {"x": 1}, lambda d: {})


def test_config_holds_what_was_said_and_the_plan_fills_in_defaults(tmp_path, tiny_llama_dir):
    from puzzle.search import resolve

    c = SearchConfig()
    assert c.given() == [] and c.speedup is None and c.bld_tokens is None
    plan = resolve(SearchConfig(model=str(tiny_llama_dir)))
    said = ("budget", "speedup", "preset", "bld_tokens", "gkd_steps")
    assert tuple(plan.value(n) for n in said) == ("8xH100", 1.5, "quick", 4096, 16)
    assert resolve(SearchConfig(model=str(tiny_llama_dir), throughput=100.0)).value("speedup") is None
    assert resolve(SearchConfig(model=str(tiny_llama_dir), preset="full")).value("bld_tokens") == 65536
    with pytest.raises(ConfigError, match="unknown key"):
        SearchConfig.from_dict({"budgte": "8xH100"})
    with pytest.raises(ConfigError, match="preset"):
        SearchConfig(preset="fast")
    (tmp_path / "s.yaml").write_text("budget: 1xH200\nspeedup: 2.0\nbld-tokens: 2048\ndata: [stdlib]\n")
    args = build_parser().parse_args(["search", "--config", str(tmp_path / "s.yaml"), "--speedup", "1.7"])
    cfg = config_from_args(args)
    assert (cfg.budget, cfg.speedup, cfg.bld_tokens, cfg.data) == ("1xH200", 1.7, 2048, ("stdlib",))
    assert (cfg.origin["budget"], cfg.origin["speedup"]) == ("file", "flag")
    # a flag's memory budget adds to the file's speedup; it never drops it
    args = build_parser().parse_args(["search", "--config", str(tmp_path / "s.yaml"), "--memory", "20"])
    assert config_from_args(args).speedup == 2.0 and config_from_args(args).memory == 20
    assert isinstance(args, argparse.Namespace)


def test_a_bad_budget_fails_before_any_stage(tmp_path):
    from puzzle.errors import UnknownTargetError
    from puzzle.search import search

    with pytest.raises(UnknownTargetError, match="H900"):
        search(SearchConfig(budget="8xH900"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
