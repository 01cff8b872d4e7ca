"""``puzzle.search(...)``: the subpackage is callable, keywords are config fields, and it stays a module."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import puzzle
import puzzle.search.api as api
from puzzle.errors import ConfigError
from puzzle.search import REGISTRY, STAGES, SearchConfig, run_search, search


@pytest.fixture
def calls(monkeypatch):
    """Record what the pipeline would run instead of running it."""
    seen: list[tuple] = []
    monkeypatch.setattr(api, "search", lambda cfg, run_dir, **kw: seen.append((cfg, run_dir, kw)) or "run")
    return seen


def test_calling_the_module_runs_a_search_with_overrides(calls, tmp_path):
    out = puzzle.search(run_dir=tmp_path / "x", budget="cpu", speedup=1.7, constraints=["layer[0] == parent"],
                        progress=False, echo=print)
    cfg, run_dir, kw = calls[0]
    assert out == "run" and run_dir == tmp_path / "x"
    assert kw == {"progress": False, "echo": print, "verify": False, "force": False}
    assert (cfg.budget, cfg.speedup, cfg.constraints) == ("cpu", 1.7, ("layer[0] == parent",))
    assert cfg.calibrate is None and cfg.origin["speedup"] == "keyword"  # only what was said; the plan derives the rest
    puzzle.search(SearchConfig(budget="1xH200"))  # a config object, positional, and the default run dir
    assert calls[1][0] == SearchConfig(budget="1xH200") and str(calls[1][1]) == "runs/search"


def test_overrides_keep_what_was_said_and_the_plan_derives_the_rest(calls, tiny_llama_dir):
    from puzzle.search import resolve

    base = SearchConfig(model=str(tiny_llama_dir), budget="8xH100", bld_tokens=2048, gkd_steps=16)
    run_search(base, "r", throughput=500.0, preset="full")
    plan = resolve(calls[0][0])
    assert plan.value("speedup") is None and plan.value("throughput") == 500.0  # no default speedup beside a budget
    sizes = tuple(plan.value(n) for n in ("bld_tokens", "gkd_steps", "eval_sequences"))
    assert sizes == (2048, 16, 8)  # said sizes kept, others preset
    assert plan.settings["gkd_steps"].source == "keyword" and plan.settings["eval_sequences"].source == "preset"
    run_search(SearchConfig(speedup=2.0), "r", memory=20.0)
    assert (calls[1][0].speedup, calls[1][0].memory) == (2.0, 20.0)  # a given speedup stays next to a new budget


def test_an_unknown_override_or_a_bad_constraint_is_a_config_error(calls):
    with pytest.raises(ConfigError, match="speedp"):
        puzzle.search(speedp=1.5)
    with pytest.raises(ConfigError, match="speedp"):
        puzzle.search(SearchConfig(), speedp=1.5)
    with pytest.raises(ConfigError, match="constraint"):
        puzzle.search(constraints=["count(attention != no_op >= 3"])
    assert calls == []


def test_it_is_still_the_subpackage():
    assert isinstance(puzzle.search, types.ModuleType) and puzzle.search.__name__ == "puzzle.search"
    assert puzzle.search.search is search and puzzle.search.SearchConfig is SearchConfig
    assert set(STAGES) <= set(REGISTRY.names()) and REGISTRY["solve"] is puzzle.search.stages.solve.STAGE
    assert "overrides" in puzzle.search.__call__.__doc__


def test_import_puzzle_is_light_and_search_loads_on_first_use():
    code = ("import sys, puzzle; heavy = {'torch', 'pandas', 'puzzle.search'} & set(sys.modules); "
            "assert not heavy, heavy; assert callable(puzzle.search) and puzzle.search.STAGES[0] == 'library'; "
            "import pytest; pytest.raises(AttributeError, lambda: puzzle.nonexistent)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_new_budget_rederives_its_defaults(tiny_llama_dir, fake_cpu_peaks):
    from puzzle.search import resolve

    gpu = SearchConfig(model=str(tiny_llama_dir), budget="8xH100")
    cpu = resolve(gpu.merge({"budget": "cpu"}))
    assert (cpu.value("calibrate"), cpu.value("fuse_threshold")) == (True, 0.0)
    assert (cpu.settings["calibrate"].source, cpu.settings["fuse_threshold"].source) == ("derived", "derived")
    kept = resolve(gpu.merge({"fuse_threshold": 0.3}).merge({"budget": "cpu"}))
    assert kept.value("fuse_threshold") == 0.3
