"""Every check before the first write (issue 31, points 3, 4 and 6): constraints against the parent's layers,
the search space's variants and the budget; the weights' headers and the tokenizer; the data's first
documents; ``--cluster`` against this machine; a run directory under a file or not writable. Each is
refused by ``puzzle search`` with one line and exit status 2, before ``plan.json`` / ``run.json`` exist."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

import pytest

from puzzle.cli.main import main
from puzzle.search import SearchConfig, resolve
from puzzle.search.preflight import OVERWRITE_SHOWN, prepare, preflight


def _refused(capsys, argv, command="search"):
    """``puzzle COMMAND --engine transformers ARGV`` (the tiny parent's FFN width 96 is no multiple of 256):
    exit 2 and one stderr line, without traceback; returns that line."""
    extra = ["--no-progress"] if command == "search" else []
    assert main([command, *extra, "--engine", "transformers", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"puzzle {command}: error: "), err
    return err.removeprefix(f"puzzle {command}: error: ")


def _copy(parent, tmp_path):
    return shutil.copytree(parent, tmp_path / "parent")


# --- constraints ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("constraint, first", [
    ("layer[99] == parent", "constraint 'layer[99] == parent': layer 99 does not exist (layers 0..2)"),
    ("layer[0] == parnt", "constraint 'layer[0] == parnt': variant == parnt: no candidate has variant = parnt"),
    ("count(atention == no_op) <= 1", "constraint 'count(atention == no_op) <= 1': atention == no_op: unknown "
                                      "attribute 'atention'"),
    ("total(params) <= 1", "infeasible: no child of the search space meets the budget and the constraints together on the "
                           "analytic costs of 8xH100-SXM:tp1:bf16: total(params) <= 1: the smallest achievable "
                           "total(params) is"),
    ("layer[0].attention == gqa:7", "infeasible: no child of the search space meets the budget and the constraints together"),
])
def test_an_impossible_constraint_is_refused_in_seconds_before_any_write(constraint, first, tiny_text_parent,
                                                                         tmp_path, capsys):
    t0 = time.perf_counter()
    err = _refused(capsys, ["--model", str(tiny_text_parent), "--constraint", constraint,
                            "--out", str(tmp_path / "run")])
    assert time.perf_counter() - t0 < 30  # not after library, BLD and scoring
    assert err.startswith(first), err
    assert not (tmp_path / "run").exists()


def test_constraints_that_cannot_hold_together_with_the_budget_are_refused(tiny_text_parent, tmp_path, capsys):
    keep = ["--constraint", "count(attention == gqa:2) >= 3", "--constraint", "count(ffn == swiglu:96) >= 3"]
    err = _refused(capsys, ["--model", str(tiny_text_parent), "--speedup", "1.05", *keep,
                            "--out", str(tmp_path / "run")])
    assert "each constraint can be met alone, but not all together" in err and "speedup >= 1.0500x" in err
    assert not (tmp_path / "run").exists()


def test_feasible_constraints_and_those_on_scores_pass(tiny_text_parent, tmp_path):
    """A constraint on a score (known after the score stage) is checked for its names only."""
    constraints = ("layer[0] == parent", "count(attention != no_op) >= 2", "count(kl > 1) >= 3",
                   "count(scored == additive) <= 9")
    plan = resolve(SearchConfig(model=str(tiny_text_parent), engine="transformers", constraints=constraints))
    assert preflight(plan, tmp_path / "run") == (tmp_path / "run").resolve()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_impossible_constraint_on_smollm2_is_refused_in_under_30_s(smollm2_source, tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["search", "--no-progress", "--constraint", "layer[99] == parent", "--out", str(tmp_path / "run")]) == 2
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    assert err == "puzzle search: error: constraint 'layer[99] == parent': layer 99 does not exist (layers 0..29)"
    assert seconds < 30 and not (tmp_path / "run").exists()


# --- the parent's files and the data -------------------------------------------------------------------------

def test_weights_with_a_broken_header_or_cut_short_are_refused(tiny_text_parent, tmp_path, capsys):
    parent = _copy(tiny_text_parent, tmp_path)
    weights = parent / "model.safetensors"
    pristine = weights.read_bytes()
    weights.write_bytes(b"\xff" * 64 + pristine[64:])
    err = _refused(capsys, ["--model", str(parent), "--out", str(tmp_path / "run")])
    assert err.startswith(f"cannot read the header of {weights}"), err
    weights.write_bytes(pristine[: len(pristine) // 2])
    err = _refused(capsys, ["--model", str(parent), "--out", str(tmp_path / "run")])
    assert err.startswith(f"{weights} is cut short: its header places tensors up to byte"), err
    assert not (tmp_path / "run").exists()


def test_a_missing_or_broken_tokenizer_is_refused(tiny_text_parent, tmp_path, capsys):
    parent = _copy(tiny_text_parent, tmp_path)
    (parent / "tokenizer.json").write_text("{ not json")
    err = _refused(capsys, ["--model", str(parent), "--out", str(tmp_path / "run")])
    assert err.startswith(f"{parent}: its tokenizer does not load ("), err
    (parent / "tokenizer.json").unlink()
    err = _refused(capsys, ["--model", str(parent), "--out", str(tmp_path / "run")])
    assert err.startswith(f"{parent} has no tokenizer files"), err
    assert not (tmp_path / "run").exists()


def test_data_whose_first_document_does_not_read_is_refused(tiny_text_parent, tmp_path, capsys):
    binary = tmp_path / "corpus.jsonl"
    binary.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)  # a gzip header, then every byte value
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "data.bin").write_bytes(b"\x00")  # no known suffix: a directory source skips it
    for source, first in ((binary, f"{binary} is not UTF-8 text (byte 0x8b; a binary file?)"),
                          (empty, f"data source '{empty}' holds no document"),
                          (nothing, f"data source '{nothing}' holds no document")):
        err = _refused(capsys, ["--model", str(tiny_text_parent), "--data", str(source),
                                "--out", str(tmp_path / "run")])
        assert err.startswith(first), err
    assert not (tmp_path / "run").exists()


# --- the cluster against this machine ------------------------------------------------------------------------

def test_a_cpu_cluster_of_more_ranks_than_cores_is_refused_by_search_not_by_plan(tiny_text_parent, tmp_path, capsys):
    cores = len(os.sched_getaffinity(0))
    cluster = f"{cores + 1}xcpu"
    err = _refused(capsys, ["--model", str(tiny_text_parent), "--cluster", cluster, "--out", str(tmp_path / "run")])
    assert err.startswith(f"--cluster {cluster} runs {cores + 1} processes on this machine, which has {cores} CPU "
                          f"core"), err
    assert f"use --cluster {cores}xcpu or fewer" in err and not (tmp_path / "run").exists()
    assert main(["plan", "--engine", "transformers", "--model", str(tiny_text_parent), "--cluster", cluster,
                 "--out", str(tmp_path / "run")]) == 0  # it plans only
    assert not (tmp_path / "run").exists()


def test_a_gpu_cluster_absent_here_is_refused_by_search_not_by_plan(tiny_text_parent, tmp_path, capsys):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 8 and "H100" in torch.cuda.get_device_name(0):
        pytest.skip("8 H100s present: --cluster 8xH100 runs here")
    err = _refused(capsys, ["--model", str(tiny_text_parent), "--cluster", "8xH100", "--out", str(tmp_path / "run")])
    if not torch.cuda.is_available():
        assert err.startswith("--cluster 8xH100 needs H100-SXM GPUs and this machine has none, only "), err
    else:
        assert err.startswith("--cluster 8xH100 ") and ("runs 8 ranks on this machine" in err or "plans H100" in err)
    assert not (tmp_path / "run").exists()
    assert main(["plan", "--engine", "transformers", "--model", str(tiny_text_parent), "--cluster", "8xH100",
                 "--out", str(tmp_path / "run")]) == 0
    assert not (tmp_path / "run").exists()


def test_a_gpu_cluster_is_held_to_the_gpus_here(monkeypatch):
    """On a machine with one H100 (CUDA stood in for: this test runs without a GPU): its device and count."""
    import torch

    from puzzle.errors import ResourceError
    from puzzle.search.cluster import check_here, parse_cluster

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    check_here(parse_cluster("1xH100"))
    with pytest.raises(ResourceError, match=r"^--cluster 8xH100 runs 8 ranks on this machine, one per GPU, and it "
                                            r"has 1 H100-SXM: use --cluster 1xH100-SXM or fewer"):
        check_here(parse_cluster("8xH100"), shown="8xH100")
    with pytest.raises(ResourceError, match=r"^--cluster 1xA100-80GB plans A100-80GB GPUs; this machine has 1 NVIDIA "
                                            r"H100 80GB HBM3 \(H100-SXM\): use --cluster 1xH100-SXM"):
        check_here(parse_cluster("1xA100"))


# --- the run directory ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("out", ["FILE/sub", "FILE/a/b"])
def test_an_out_under_a_file_is_refused(out, tiny_text_parent, tmp_path, capsys):
    (tmp_path / "FILE").write_text("mine")
    err = _refused(capsys, ["--model", str(tiny_text_parent), "--out", str(tmp_path / out)])
    assert err == (f"--out {tmp_path / out}: {tmp_path / 'FILE'} is a file, not a directory; name a run directory "
                   "outside it")
    assert (tmp_path / "FILE").read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file modes (the read-only mount test covers it)")
def test_an_out_without_write_permission_is_refused(tiny_text_parent, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    err = _refused(capsys, ["--model", str(tiny_text_parent), "--out", str(locked / "run")])
    assert err == f"--out {locked / 'run'}: {locked} is not writable (permission denied); choose a run directory " \
                  "you can write to"
    assert list(locked.iterdir()) == []


@pytest.mark.slow  # a CLI subprocess (~10 s importing torch)
def test_an_out_on_a_read_only_mount_is_refused(tiny_text_parent, tmp_path):
    from benchmarks.reliability_cases import Unavailable, read_only

    try:
        prefix = read_only(tmp_path / "ro")
    except Unavailable as e:
        pytest.skip(str(e))
    out = tmp_path / "ro" / "run"
    done = subprocess.run([*prefix, sys.executable, "-m", "puzzle.cli.main", "search", "--no-progress", "--engine",
                           "transformers", "--model", str(tiny_text_parent), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"puzzle search: error: --out {out}: {tmp_path / 'ro'} is not writable (on a read-only file system); "
        "choose a run directory you can write to")
    assert list((tmp_path / "ro").iterdir()) == []


def test_force_names_the_entries_it_overwrites(tiny_text_parent, tmp_path, caplog):
    plan = resolve(SearchConfig(model=str(tiny_text_parent), engine="transformers"))
    mine = tmp_path / "mine"
    (mine / "solve").mkdir(parents=True)
    (mine / "run.json").write_text('{"my": "notes"}')
    (mine / "notes.txt").write_text("kept")
    run_dir = preflight(plan, mine, force=True)
    with caplog.at_level(logging.WARNING, logger="puzzle.search.preflight"):
        prepare(plan, run_dir, run_dir, shareable=[])
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (f"--force: {run_dir} holds no puzzle run, and this search overwrites 2 of its entries: "
                       "run.json, solve/")
    assert (mine / "notes.txt").read_text() == "kept"


def test_force_names_the_first_few_and_the_count(tiny_text_parent, tmp_path, caplog):
    plan = resolve(SearchConfig(model=str(tiny_text_parent), engine="transformers"))
    mine = tmp_path / "mine"
    names = ["bld", "evaluate", "export", "fuse", "gkd", "library", "score", "solve"]
    for name in names:
        (mine / name).mkdir(parents=True)
    run_dir = preflight(plan, mine, force=True)
    with caplog.at_level(logging.WARNING, logger="puzzle.search.preflight"):
        prepare(plan, run_dir, run_dir, shareable=[])
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    shown = ", ".join(f"{n}/" for n in names[:OVERWRITE_SHOWN])
    assert warning.endswith(f"overwrites {len(names)} of its entries: {shown}, ...")
