"""One writer per run directory: of two searches started together on one directory one is refused at once
with a line naming the other's pid, the other finishes and a rerun skips every stage; locks and claims die
with their holder; a stage's manifest is written after its files, and a stage whose recorded files are
gone is redone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from puzzle.cli.main import main
from puzzle.errors import RunInUseError
from puzzle.search import STAGES, SearchConfig, search
from puzzle.search.lock import LOCK_FILE, check_free, claim, hold
from puzzle.search.manifest import MANIFEST, clean_temporaries, matching_files, run_stage
from puzzle.search.preflight import check_run_directory

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--no-progress", "--engine", "transformers", "--budget", "8xH100", "--speedup", "1.2", "--bld-tokens", "2048",
        "--bld-eval-sequences", "1", "--score-sequences", "1", "--score-seq-len", "32", "--finalists", "1",
        "--child-bld-tokens", "0", "--fuse-sequences", "1", "--fuse-distill-steps", "0", "--gkd-steps", "0",
        "--eval-sequences", "1", "--no-speed"]
"""The smallest whole search on the tiny parent (about 20 s on 2 idle cores)."""


def _puzzle(*argv: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "puzzle.cli.main", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _holding(what: str, run: Path) -> subprocess.Popen:
    """A process that holds ``hold(run)`` or ``claim(run)`` until killed (started once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", f"import time\nfrom puzzle.search.lock import {what}\n"
                             f"with {what}({str(run)!r}):\n    print('holding', flush=True)\n    time.sleep(120)"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


@pytest.mark.slow  # a whole search in a subprocess (about 20 s idle, a minute on 2 busy cores)
def test_two_searches_started_together_one_is_refused_at_once_the_other_finishes(tiny_text_parent, tmp_path,
                                                                                  monkeypatch, capsys):
    """The issue's case: two searches 0.3 s apart on one directory. Whichever claims it first runs; the other
    is refused within 5 s of its start with one line naming the first's pid; a rerun skips every stage."""
    out = tmp_path / "run"
    env = {**os.environ, "PUZZLE_CACHE_DIR": str(tmp_path / "cache")}
    argv = ["search", "--model", str(tiny_text_parent), "--out", str(out), *FAST]
    started: list[tuple[subprocess.Popen, float]] = []
    try:
        started.append((_puzzle(*argv, env=env), time.monotonic()))
        time.sleep(0.3)
        started.append((_puzzle(*argv, env=env), time.monotonic()))
        while all(p.poll() is None for p, _ in started):
            time.sleep(0.02)
        k = next(i for i, (p, _) in enumerate(started) if p.poll() is not None)
        (refused, t0), (winner, _) = started[k], started[1 - k]
        seconds = time.monotonic() - t0
        _, err = refused.communicate()
        assert refused.returncode == 2, err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"puzzle search: error: --out {out} is in use by another search (pid {winner.pid}, "
                              "started "), err
        assert err.rstrip().endswith("; wait for it or choose another --out")
        assert seconds < 5.0
        stdout, err = winner.communicate(timeout=600)
    finally:
        for p, _ in started:
            if p.poll() is None:
                p.kill()
    assert winner.returncode == 0, err
    assert f"[{len(STAGES)}/{len(STAGES)}] evaluate: done" in stdout
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert lines == [f"[{k}/{len(STAGES)}] {s}: up to date, skipped" for k, s in enumerate(STAGES, 1)]


def test_the_lock_dies_with_its_holder(tmp_path):
    holder = _holding("hold", tmp_path / "run")
    try:
        with pytest.raises(RunInUseError, match=rf"pid {holder.pid}, started .*; wait for it or choose another --out"):
            check_free(tmp_path / "run")
        with pytest.raises(RunInUseError, match=rf"--out runs/x is in use by another search \(pid {holder.pid}"):
            with hold(tmp_path / "run", display="runs/x"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: nothing runs on the way out
        holder.wait()
    check_free(tmp_path / "run")
    with hold(tmp_path / "run") as path:
        assert path.read_text().startswith(f'{{"pid": {os.getpid()}, ')


def test_a_claim_writes_nothing_into_the_run_refuses_at_once_and_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    holder = _holding("claim", run)
    try:
        assert not run.exists() and list(tmp_path.iterdir()) == []  # the claim lives in the runtime directory
        t0 = time.monotonic()
        with pytest.raises(RunInUseError, match=rf"--out {run} is in use by another search \(pid {holder.pid}, "):
            with claim(run):
                pass
        assert time.monotonic() - t0 < 3.0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with claim(run):
        assert not run.exists()
        with hold(run):  # what the search it guards takes once its checks passed
            pass
    with hold(run):  # a search through the API (no claim) holds the directory: the CLI's claim sees it
        with pytest.raises(RunInUseError, match=rf"pid {os.getpid()}, "):
            with claim(run):
                pass


@pytest.mark.slow  # two resolves and preflights of the tiny parent, and two refusals that retry 1 s each
def test_a_search_on_a_held_directory_writes_nothing(tiny_text_parent, tmp_path):
    run, shared = tmp_path / "run", tmp_path / "shared"
    cfg = SearchConfig(model=str(tiny_text_parent), engine="transformers", budget="8xH100", speedup=1.2)
    with hold(run):
        with pytest.raises(RunInUseError, match=f"--out {run} is in use by another search"):
            search(cfg, run, progress=False)
    with hold(shared):
        with pytest.raises(RunInUseError, match=f"shared_dir {shared} is in use .*; wait for it or choose another "
                                                "shared_dir"):
            search(cfg, run, progress=False, shared_dir=shared)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    assert sorted(p.name for p in shared.iterdir()) == [LOCK_FILE]


def test_a_lock_file_alone_is_no_foreign_file_and_is_never_recorded_or_cleaned(tmp_path):
    run = tmp_path / "run"
    with hold(run):  # a search that died between taking the lock and writing run.json leaves this
        pass
    assert check_run_directory(run, protected=[]) == run.resolve()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="holds files but no puzzle run"):
        check_run_directory(run, protected=[])
    (run / "notes.txt").unlink()
    (run / "a").mkdir()
    (run / "a" / "x.bin").write_bytes(b"x")
    assert clean_temporaries(run) == [] and (run / LOCK_FILE).is_file()
    assert matching_files(run, ["**"]) == ["a/x.bin"]


# ------------------------------------------------------------------------------ manifests


def test_a_manifest_is_written_only_after_every_file_of_its_stage(tmp_path):
    def partial(d: Path) -> dict:
        (d / "a.bin").write_bytes(b"a" * 10)
        assert not (d / MANIFEST).exists()
        raise OSError(28, "No space left on device")  # dies before its second file

    with pytest.raises(OSError):
        run_stage(tmp_path, "s", {"v": 1}, partial)
    assert not (tmp_path / "s" / MANIFEST).exists()  # the half-done stage is not done

    def whole(d: Path) -> dict:
        (d / "a.bin").write_bytes(b"a" * 10)
        (d / "b.bin").write_bytes(b"b" * 20)
        return {}

    result = run_stage(tmp_path, "s", {"v": 1}, whole)
    assert not result.skipped and result.reason == "s: never completed"
    assert run_stage(tmp_path, "s", {"v": 1}, whole).skipped
    # a redo under a new key that dies leaves no manifest either: the old one is gone before the work starts
    with pytest.raises(OSError):
        run_stage(tmp_path, "s", {"v": 2}, partial)
    assert not (tmp_path / "s" / MANIFEST).exists()
    assert not run_stage(tmp_path, "s", {"v": 1}, whole).skipped


def test_a_recorded_file_gone_redoes_the_stage_though_its_manifest_says_done(tmp_path):
    calls: list[int] = []

    def library(d: Path) -> dict:
        calls.append(1)
        (d / "lib" / "init").mkdir(parents=True, exist_ok=True)
        for name in ("L000.attention.gqa-2.safetensors", "L000.ffn.swiglu-48.safetensors"):
            (d / "lib" / "init" / name).write_bytes(b"w" * 64)
        return {"library": str(d / "lib")}

    run_stage(tmp_path, "library", {"v": 1}, library)
    (tmp_path / "library" / "lib" / "init" / "L000.attention.gqa-2.safetensors").unlink()
    result = run_stage(tmp_path, "library", {"v": 1}, library)
    assert not result.skipped and len(calls) == 2
    assert result.reason == ("library: library/lib/init/L000.attention.gqa-2.safetensors is missing; "
                             "redoing library")
    assert (tmp_path / "library" / "lib" / "init" / "L000.attention.gqa-2.safetensors").is_file()
    assert run_stage(tmp_path, "library", {"v": 1}, library).skipped
