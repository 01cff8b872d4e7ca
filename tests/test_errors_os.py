"""The file system's refusals (a full disk, a read-only --out, a file where a directory should be) are
one line each, exit status 2, no traceback; interrupted atomic writes leave no partial file, so the
rerun after the cause is fixed resumes.

A full disk is simulated in two ways: a failing write (monkeypatched, anywhere), and, where a mount
namespace may be made (``unshare -rm``: no privilege needed where user namespaces are allowed), a real
tmpfs of a few MiB that a tiny search fills, then grown for the rerun."""

from __future__ import annotations

import errno
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks.reliability_cases import COSTS, SCORES  # the same 3-layer problem for `puzzle solve`
from puzzle.cli.main import main
from puzzle.errors import StorageError
from puzzle.io import (atomic_directory, atomic_file, atomic_write_text, replace_directory, save_safetensors,
                       save_safetensors_streamed)
from puzzle.os_errors import shown_path, storage_error

ROOT = Path(__file__).resolve().parent.parent

def _solve_argv(tmp: Path, out: Path) -> list[str]:
    (tmp / "scores.csv").write_text(SCORES)
    (tmp / "costs.csv").write_text(COSTS)
    return ["solve", "--scores", str(tmp / "scores.csv"), "--costs", str(tmp / "costs.csv"), "--score-column", "kl",
            "--batch", "2", "--context", "10", "--engine", "transformers", "--out", str(out)]


def _error_line(err: str, command: str) -> str:
    """The one error line of a failed command's stderr (logs may come before it), checked to be the last."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"puzzle {command}: error: ")]
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err
    return errors[0]


def _enospc(path=None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if path is not None else []))


# --- the messages -------------------------------------------------------------------------------------

def test_no_space_names_the_final_path_not_the_temporary_and_promises_the_resume(tmp_path):
    temporary = tmp_path / "run" / "child_bld" / ".child.ab_12xyz.tmp" / ".model.safetensors.q0w9e8r7.tmp"
    error = storage_error(_enospc(temporary), out=tmp_path / "run", resumes=True)
    assert isinstance(error, StorageError) and isinstance(error, OSError)
    assert str(error) == (f"no space left on device writing {tmp_path}/run/child_bld/child/model.safetensors: "
                          "free space and rerun; the run resumes from its finished stages")


def test_an_error_without_a_path_names_the_out_directory():
    assert str(storage_error(_enospc(), out="runs/x")) == "no space left on device writing under runs/x: free space and rerun"


def test_read_only_and_permission_say_what_to_change(tmp_path):
    ro = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro" / ".sol.json.abcdefgh.tmp"))
    assert str(storage_error(ro, out=tmp_path / "ro" / "sol.json")) == (
        f"read-only file system writing {tmp_path}/ro/sol.json: make it writable or choose another --out, and rerun")
    denied = OSError(errno.EACCES, "Permission denied", "/etc/puzzle-cache/x")
    assert str(storage_error(denied, out="runs/x")) == (
        "permission denied: /etc/puzzle-cache/x: make it accessible to this user or choose another place, and rerun")


def test_a_run_resumes_only_in_the_same_directory(tmp_path):
    ro = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / "score" / "scores.csv"))
    assert str(storage_error(ro, out=tmp_path / "run", resumes=True)).endswith(
        "make it writable or choose another --out, and rerun; with the same --out the run resumes from its "
        "finished stages")


def test_a_file_in_the_way_is_named(tmp_path):
    (tmp_path / "FILE").write_text("mine")
    error = OSError(errno.ENOTDIR, "Not a directory", str(tmp_path / "FILE" / "sub" / "x"))
    assert str(storage_error(error, out=tmp_path / "FILE" / "sub")) == (
        f"not a directory: {tmp_path}/FILE is a file, so --out {tmp_path}/FILE/sub cannot be made: "
        "move FILE away or choose another --out")
    exists = OSError(errno.EEXIST, "File exists", str(tmp_path / "FILE"))  # what mkdir(parents=True) says
    assert str(storage_error(exists)).startswith(f"not a directory: {tmp_path}/FILE is a file")


def test_safetensors_wrapped_io_errors_are_read_and_other_errors_are_not():
    from safetensors import SafetensorError

    wrapped = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert str(storage_error(wrapped, out="o")).startswith("no space left on device writing under o")
    assert storage_error(ValueError("a bug")) is None
    assert storage_error(SafetensorError("header too large")) is None
    own = FileExistsError("x already exists and is not empty; choose another path")  # no errno: our own message
    assert str(storage_error(own)) == "x already exists and is not empty; choose another path"


def test_shown_path_keeps_ordinary_names():
    assert shown_path("/a/.b.tmp/.c.json.x1y2z3w4.tmp") == Path("/a/.b.tmp/c.json")


# --- interrupted writes leave nothing half written ----------------------------------------------------

def test_atomic_write_text_names_the_file_a_full_disk_stopped_and_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")

    def full(fd):
        raise _enospc()

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        atomic_write_text(path, "new")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_file_removes_its_temporary_and_names_the_target(tmp_path):
    target = tmp_path / "w.bin"
    with pytest.raises(OSError) as e, atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise _enospc()
    assert e.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_save_safetensors_leaves_no_partial_file_when_safetensors_fails(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    with pytest.raises(OSError) as e:
        save_safetensors({"w": torch.zeros(4)}, tmp_path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_streamed_save_leaves_no_partial_file(tmp_path):
    specs = {"a": ((4,), torch.float32), "b": ((4,), torch.float32)}

    def read(name):
        if name == "b":
            raise _enospc()
        return torch.zeros(4)

    with pytest.raises(OSError) as e:
        save_safetensors_streamed(specs, read, tmp_path)
    assert e.value.filename == str(tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_removes_its_temporary(tmp_path):
    with pytest.raises(OSError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "x").write_text("half")
        raise _enospc()
    assert list(tmp_path.iterdir()) == []


def test_replace_directory_puts_the_old_one_back_when_the_swap_fails(tmp_path, monkeypatch):
    old, new = tmp_path / "model", tmp_path / "new"
    old.mkdir(), new.mkdir()
    (old / "keep").write_text("old")
    real = os.replace

    def fail_second(src, dst):
        if Path(src) == new:
            raise OSError(errno.EIO, "Input/output error", str(src))
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError):
        replace_directory(new, old)
    assert (old / "keep").read_text() == "old"


# --- through the CLI ----------------------------------------------------------------------------------

def test_solve_on_a_full_disk_is_one_line_and_the_rerun_writes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "arch.json"
    argv = _solve_argv(tmp_path, out)

    def full(fd):
        raise _enospc()

    monkeypatch.setattr(os, "fsync", full)
    assert main(argv) == 2
    line = _error_line(capsys.readouterr().err, "solve")
    assert line == f"puzzle solve: error: no space left on device writing {out}: free space and rerun"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["costs.csv", "scores.csv"]  # nothing half written
    monkeypatch.undo()
    assert main(argv) == 0
    assert out.is_file()


def test_export_on_a_full_disk_leaves_nothing_and_the_rerun_exports(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "exports" / "deci"
    argv = ["export", str(tiny_llama_dir), "--out", str(out), "--engine", "transformers"]
    real = safetensors.torch.save_file

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    assert main(argv) == 2
    line = _error_line(capsys.readouterr().err, "export")
    assert line == f"puzzle export: error: no space left on device writing {out}/model.safetensors: free space and rerun"
    assert list((tmp_path / "exports").iterdir()) == []  # neither the export nor its temporary
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert main(argv) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_export_under_a_file_names_the_file(tiny_llama_dir, tmp_path, capsys):
    (tmp_path / "FILE").write_text("mine")
    out = tmp_path / "FILE" / "sub"
    assert main(["export", str(tiny_llama_dir), "--out", str(out), "--engine", "transformers"]) == 2
    line = _error_line(capsys.readouterr().err, "export")
    assert line == (f"puzzle export: error: not a directory: {tmp_path}/FILE is a file, so --out {out} cannot be "
                    "made: move FILE away or choose another --out")
    assert (tmp_path / "FILE").read_text() == "mine"


# --- a real read-only volume and a real full disk (a mount namespace of the test's own) ------------------

@functools.cache
def _namespaces() -> bool:
    """Whether ``unshare -rm`` may mount here (a bind mount and a tmpfs, undone when the command ends)."""
    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0" && '
                                'mount --bind -o ro "$0" "$0" && ! touch "$0/x"', d], capture_output=True, timeout=30)
        return probe.returncode == 0


needs_namespaces = pytest.mark.skipif("not _namespaces()", reason="unshare -rm cannot mount here")


@needs_namespaces
def test_solve_into_a_read_only_directory_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    argv = _solve_argv(tmp_path, ro / "arch.json")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(ro),
                           sys.executable, "-m", "puzzle.cli.main", *argv],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert _error_line(proc.stderr, "solve") == (
        f"puzzle solve: error: read-only file system writing {ro}/arch.json: make it writable or choose another "
        "--out, and rerun")
    assert list(ro.iterdir()) == []


TINY = ["--engine", "transformers", "--budget", "8xH100", "--speedup", "1.2", "--bld-tokens", "8192",
        "--score-sequences", "1", "--score-seq-len", "32", "--fuse-sequences", "1", "--fuse-distill-steps", "2",
        "--gkd-steps", "2", "--gkd-batch", "1", "--eval-sequences", "1", "--no-speed"]


@pytest.mark.slow  # two tiny searches (about 2 minutes on 2 cores)
@needs_namespaces
def test_a_search_that_fills_the_disk_is_one_line_and_the_rerun_resumes(tiny_text_parent, tmp_path):
    """A 24 MiB tmpfs holds the tiny parent's library, BLD, scores and solution (about 17 MiB), not its
    child; grown to 300 MiB, the same command skips the finished stages and completes."""
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir(), logs.mkdir()
    search = " ".join([sys.executable, "-m", "puzzle.cli.main", "search", "--model", str(tiny_text_parent),
                       "--out", '"$0/run"', *TINY])
    script = (f'mount -t tmpfs -o size=24m tmpfs "$0" || exit 99; {search} >"$1/out1" 2>"$1/err1"; echo $? >"$1/rc1"; '
              f'ls -A "$0/run" >"$1/ls1"; mount -o remount,size=300m tmpfs "$0"; '
              f'{search} >"$1/out2" 2>"$1/err2"; echo $? >"$1/rc2"')
    subprocess.run(["unshare", "-rm", "sh", "-c", script, str(disk), str(logs)], timeout=1200, cwd=ROOT, check=True)
    read = lambda name: (logs / name).read_text()  # noqa: E731
    assert read("rc1").strip() == "2", read("err1")[-3000:]
    line = _error_line(read("err1"), "search")
    assert line.startswith(f"puzzle search: error: no space left on device writing {disk}/run/"), line
    assert line.endswith(": free space and rerun; the run resumes from its finished stages")
    assert not [n for n in read("ls1").split() if n.endswith(".tmp")]  # no temporary left at the top
    assert read("rc2").strip() == "0", read("err2")[-3000:]
    assert "library: up to date, skipped" in read("out2")  # resumed, not redone
    assert "evaluate: done" in read("out2")
