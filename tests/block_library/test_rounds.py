"""Build and BLD in rounds: the packing, and rounds that change memory but never results."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from block_library import build_library, open_library, rounds, train_library
from block_library.rounds import pad_rounds, parse_size, plan_rounds
from puzzle.errors import ConfigError, ResourceError

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20


# ------------------------------------------------------------------------------------------ planning


def test_plan_rounds_packs_consecutive_variants_under_the_budget():
    items = [("a", 1), ("b", 2), ("c", 3), ("d", 1), ("e", 4)]
    assert plan_rounds(items, 16 * 4) == [["a", "b"], ["c", "d"], ["e"]]
    assert plan_rounds(items, 16 * 6) == [["a", "b", "c"], ["d", "e"]]
    assert plan_rounds(items, 4 * 4, bytes_per_param=4) == [["a", "b"], ["c", "d"], ["e"]]
    assert plan_rounds(items, None) == [["a", "b", "c", "d", "e"]]
    assert plan_rounds(items, 1e12) == [["a", "b", "c", "d", "e"]]
    assert plan_rounds([], 100) == [] and plan_rounds([], None) == []
    assert plan_rounds([("no_op", 0), ("x", 1)], 16) == [["no_op", "x"]]


def test_a_variant_over_the_budget_is_a_one_line_resource_error():
    with pytest.raises(ResourceError, match=r"^variant L003.ffn.swiglu:96 needs 16.00 MiB but a rank has 8.00 MiB "
                       r"for variants; raise --max-memory-per-rank or use more ranks$"):
        plan_rounds([("L003.ffn.swiglu:1", 1), ("L003.ffn.swiglu:96", MiB)], 8 * MiB)


def test_pad_rounds_appends_empty_rounds():
    assert pad_rounds([["a"], ["b", "c"]], 4) == [["a"], ["b", "c"], [], []]
    assert pad_rounds([], 1) == [[]]


def test_parse_size_reads_decimal_and_binary_units():
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("6GiB") == 6 * 2**30
    assert parse_size("512MiB") == 512 * MiB
    assert parse_size("1.5 tb") == 1_500_000_000_000
    assert parse_size("6") == parse_size(6) == 6 * 2**30  # a bare number is GiB, as --memory is
    for bad in ("lots", "6XB", "-1GB", "0", ""):
        with pytest.raises(ConfigError, match=r"^--max-memory-per-rank: cannot read .* as a memory size"):
            parse_size(bad)


def test_cli_rejects_a_bad_size_with_one_line(tmp_path, capsys):
    from puzzle.cli.main import main

    assert main(["library", "train", str(tmp_path), "--max-memory-per-rank", "lots"]) == 2
    assert "--max-memory-per-rank: cannot read 'lots'" in capsys.readouterr().err


# ------------------------------------------------------------------------------- on the tiny parent


@contextmanager
def _no_fixed_memory() -> Iterator[None]:
    """``max_memory_bytes`` is then the variant budget itself (test hook: the fixed part is 0)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rounds, "fixed_bytes", lambda session, stage="bld": 0.0)
        yield


def _budget(lib: Path, *, bytes_per_param: int, trainable: bool) -> float:
    """A budget that splits the tiny library's variants into about four rounds."""
    t = open_library(lib).table
    if trainable:
        t = t[~t.is_parent.astype(bool) & (t.kind != "no_op")]
    return bytes_per_param * max(t.params.sum() / 4, t.params.max())


def _max_diff(a: Path, b: Path) -> float:
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    worst = 0.0
    for f in files:
        x, y = load_file(a / f), load_file(b / f)
        assert x.keys() == y.keys()
        worst = max([worst] + [(x[k] - y[k]).abs().max().item() for k in x])
    return worst


@pytest.fixture(scope="module")
def built(tiny_text_parent, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rounds") / "built"
    build_library(str(tiny_text_parent), out, tiny_config(tokens=512), progress=False)  # 4 steps
    return out


@pytest.fixture(scope="module")
def one_round(built, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rounds") / "one"
    shutil.copytree(built, out)
    train_library(out, progress=False)
    return out


@pytest.mark.slow  # builds and trains libraries
def test_bld_in_rounds_trains_the_same_weights_as_one_round(built, one_round, tmp_path, caplog):
    lib = tmp_path / "lib"
    shutil.copytree(built, lib)
    with _no_fixed_memory(), caplog.at_level(logging.INFO, logger="block_library"):
        train_library(lib, progress=False, max_memory_bytes=_budget(built, bytes_per_param=16, trainable=True))
    info = open_library(lib).manifest["bld"]["rounds"]
    assert info["count"] >= 3 and sum(s for r in info["sizes"] for s in r) == 3 * 8
    assert open_library(one_round).manifest["bld"]["rounds"] == {"count": 1, "sizes": [[24]]}
    assert f"BLD round 1/{info['count']}: {info['sizes'][0][0]} variants" in caplog.text
    assert _max_diff(one_round / "trained", lib / "trained") <= 1e-6
    a, b = open_library(one_round).table, open_library(lib).table
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=0)
    for name in ("losses.csv", "validation.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(one_round / "bld" / name), pd.read_csv(lib / "bld" / name),
                                      check_exact=False, atol=1e-6, rtol=0)
    assert sorted(p.name for p in (lib / "bld").iterdir()) == ["losses.csv", "validation.csv"]  # no round left-overs


@pytest.mark.slow  # builds a library twice
def test_build_in_rounds_is_the_same_as_one_round(tiny_text_parent, built, tmp_path):
    out = tmp_path / "lib"
    with _no_fixed_memory():
        build_library(str(tiny_text_parent), out, tiny_config(tokens=512), progress=False,
                      max_memory_bytes=_budget(built, bytes_per_param=4, trainable=False))
    info = open_library(out).manifest["build"]["rounds"]
    assert info["count"] >= 3 and sum(s for r in info["sizes"] for s in r) == 3 * 12
    assert _max_diff(built / "init", out / "init") == 0
    pd.testing.assert_frame_equal(open_library(built).table, open_library(out).table, check_exact=False, atol=1e-6, rtol=0)


@pytest.mark.slow  # trains a library twice
def test_a_run_killed_in_round_3_resumes_there_without_retraining_rounds_1_and_2(built, one_round, tmp_path, caplog):
    lib = tmp_path / "lib"
    shutil.copytree(built, lib)
    budget = _budget(built, bytes_per_param=16, trainable=True)
    recorded: list[int] = []

    def on_step(step: int) -> None:
        if recorded == [0, 1] and step == 3:  # round 3 (k = 2), just after its step-2 checkpoint
            raise KeyboardInterrupt

    with _no_fixed_memory(), pytest.raises(KeyboardInterrupt):
        train_library(lib, progress=False, max_memory_bytes=budget, on_step=on_step, on_round=recorded.append)
    progress = json.loads((lib / "bld" / "rounds.json").read_text())
    assert len(progress["rounds"]) == 2
    assert json.loads((lib / "bld" / "ckpt" / "latest.json").read_text())["round"] == 2
    assert open_library(lib).status == "initialized"
    first_two = [key for r in progress["rounds"] for part in r["variants"] for key in part]
    files = [lib / "trained" / (key.replace(":", "-") + ".safetensors") for key in first_two]
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    with _no_fixed_memory(), caplog.at_level(logging.INFO, logger="block_library"):
        train_library(lib, progress=False, max_memory_bytes=budget, on_round=recorded.append)
    bld = open_library(lib).manifest["bld"]
    assert bld["resumed_at_round"] == 2 and bld["resumed_at_step"] == 2
    assert recorded[:2] == [0, 1] and recorded[2] == 2  # the rerun's first round is round 3
    assert f"resuming BLD at round 3 of {bld['rounds']['count']}" in caplog.text
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes  # rounds 1 and 2: not retrained
    assert _max_diff(one_round / "trained", lib / "trained") <= 1e-6
    pd.testing.assert_frame_equal(open_library(one_round).table, open_library(lib).table,
                                  check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(pd.read_csv(one_round / "bld" / "losses.csv"), pd.read_csv(lib / "bld" / "losses.csv"),
                                  check_exact=False, atol=1e-6, rtol=0)
    assert not (lib / "bld" / "rounds.json").exists() and not (lib / "bld" / "ckpt").exists()


@pytest.mark.slow  # trains a library twice
def test_a_rerun_with_another_limit_trains_the_rest_and_the_lost_files(built, one_round, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(built, lib)

    def stop(k: int) -> None:
        if k == 1:
            raise KeyboardInterrupt

    with _no_fixed_memory(), pytest.raises(KeyboardInterrupt):
        train_library(lib, progress=False, max_memory_bytes=_budget(built, bytes_per_param=16, trainable=True),
                      on_round=stop)
    done = json.loads((lib / "bld" / "rounds.json").read_text())["rounds"]
    (s0,), (s1,) = (r["variants"] for r in done)
    lost = lib / "trained" / (s0[0].replace(":", "-") + ".safetensors")
    lost.unlink()
    train_library(lib, progress=False)  # no limit: everything left, the lost variant too, in one round
    bld = open_library(lib).manifest["bld"]
    assert bld["resumed_at_round"] == 2
    assert bld["rounds"] == {"count": 3, "sizes": [[len(s0) - 1], [len(s1)], [24 - len(s0) - len(s1) + 1]]}
    assert lost.is_file() and _max_diff(one_round / "trained", lib / "trained") <= 1e-6
    pd.testing.assert_frame_equal(pd.read_csv(one_round / "bld" / "losses.csv"), pd.read_csv(lib / "bld" / "losses.csv"),
                                  check_exact=False, atol=1e-6, rtol=0)


@pytest.mark.slow  # loads the tiny parent
def test_a_limit_below_the_fixed_memory_or_a_variant_is_a_resource_error(built, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(built, lib)
    with pytest.raises(ResourceError, match="before any variant .*--max-memory-per-rank is 1.00 MiB"):
        train_library(lib, progress=False, max_memory_bytes=MiB)
    with _no_fixed_memory(), pytest.raises(ResourceError, match=r"variant L000.attention.gqa:1 needs .* MiB"):
        train_library(lib, progress=False, max_memory_bytes=1000)
    assert not (lib / "trained").exists() and not (lib / "bld").exists()


@pytest.mark.slow  # two torchrun processes
def test_two_processes_in_rounds_train_the_same_weights_as_one_round(built, one_round, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(built, lib)
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        from block_library import rounds, train_library
        rounds.fixed_bytes = lambda session, stage="bld": 0.0  # the limit is the variant budget
        train_library({str(lib)!r}, progress=False, max_memory_bytes={_budget(built, bytes_per_param=16, trainable=True) / 2})
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = open_library(lib).manifest["bld"]["rounds"]
    assert info["count"] >= 2 and all(len(sizes) == 2 for sizes in info["sizes"])
    assert sum(s for r in info["sizes"] for s in r) == 24
    assert _max_diff(one_round / "trained", lib / "trained") <= 1e-6
    pd.testing.assert_frame_equal(open_library(one_round).table, open_library(lib).table,
                                  check_exact=False, atol=1e-6, rtol=0)
