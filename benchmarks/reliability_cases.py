"""The reliability cases of issue 31: one command each that a new user could type and that must be refused
with one line, exit status 2, no traceback, and nothing written.

Each :class:`Case` builds its inputs in a fresh temporary directory (a copy of the tiny parent with one
thing broken, a binary data file, a read-only directory, ...) and returns the whole command line,
``python -m puzzle.cli.main ...`` with ``--no-progress`` and the tiny settings below, and says what the
first line of stderr must match (for the misleading messages of the issue's point 8, also what it must
not say). ``benchmarks/reliability_run.py`` runs and judges them; both ``tests/reliability/`` and
``benchmarks/reliability.py`` read :data:`CASES`, and the benchmark does not import the tests.

The faults (a full disk mid-run), two searches on one directory and a parent changed in place need
more than one command; their tests sit beside the code that handles them.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--engine", "transformers", "--budget", "8xH100", "--speedup", "1.2", "--bld-tokens", "2048",
        "--bld-eval-sequences", "2", "--score-sequences", "1", "--score-seq-len", "32", "--finalists", "1",
        "--child-bld-tokens", "0", "--gkd-steps", "0", "--fuse-threshold", "0", "--eval-sequences", "1", "--no-speed"]
"""The smallest search of the tiny parent (whose FFN width 96 only --engine transformers loads): a case that
is not refused runs this whole search, about 35 s on 2 busy cores rather than the quick preset's minutes."""

# A 3-layer problem for `puzzle solve`: the parent's block, a smaller one and no attention on each layer.
_VARIANTS = (("gqa:2|swiglu:96", 100, 32, 1.0, True), ("gqa:1|swiglu:48", 60, 16, 0.6, False),
             ("no_op|swiglu:96", 80, 0, 0.7, False))
SCORES = "layer,variant,kl\n" + "".join(f"{layer},{v},{0.0 if parent else 0.1 * (layer + 1)}\n"
                                        for layer in range(3) for v, _, _, _, parent in _VARIANTS)
COSTS = "layer,variant,params,weight_bytes,kv_bytes_per_token,decode_ms,is_parent\n-1,fixed,50,100,0,0.5,\n" + "".join(
    f"{layer},{v},{p},{2 * p},{kv},{ms},{parent}\n" for layer in range(3) for v, p, kv, ms, parent in _VARIANTS)


class Unavailable(Exception):
    """This machine cannot make the case (no way to make a directory read-only, enough GPUs for the cluster)."""


@dataclass(frozen=True)
class Case:
    """One refusal: the issue's point it comes from, how to make it, and what must come out."""

    name: str
    why: int
    """The point of the issue's "Why" list (3-8)."""
    setup: Callable[[Path, Path], list[str]]
    """``setup(tmp, parent)``: write the inputs under ``tmp`` (``parent`` is the pristine tiny parent, shared:
    copy it to break it) and return the command line."""
    message: str
    """Regular expression searched in the first line of stderr."""
    unwritten: tuple[str, ...] = (".",)
    """Paths under ``tmp`` that must hold after the command exactly what they held before (default: all)."""
    exit: int = 2
    quick: bool = False
    """In ``benchmarks/reliability.py --quick``."""


# --- building the inputs ----------------------------------------------------------------------------------


def puzzle(*args: str) -> list[str]:
    """The CLI as a new process: ``python -m puzzle.cli.main ARGS``."""
    return [sys.executable, "-m", "puzzle.cli.main", *args]


def search(tmp: Path, parent: Path, *extra: str, out: str = "run") -> list[str]:
    """``puzzle search`` of ``parent`` into ``tmp/out`` with the tiny settings, then ``extra`` (later flags win)."""
    return puzzle("search", "--no-progress", *TINY, "--model", str(parent), "--out", str(tmp / out), *extra)


def copy_parent(tmp: Path, parent: Path) -> Path:
    """A private copy of the tiny parent, to break."""
    return Path(shutil.copytree(parent, tmp / "parent"))


def edit_config(tmp: Path, parent: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the parent whose config.json went through ``edit``."""
    copy = copy_parent(tmp, parent)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy


def binary_file(path: Path) -> Path:
    """A file of bytes that are no UTF-8 text (a gzip header, then every byte value)."""
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    return path


def solve_tables(tmp: Path, scores: str = SCORES) -> list[str]:
    """The scores and costs tables of a 3-layer problem, as `puzzle solve` flags."""
    (tmp / "scores.csv").write_text(scores)
    (tmp / "costs.csv").write_text(COSTS)
    return ["--scores", str(tmp / "scores.csv"), "--costs", str(tmp / "costs.csv"), "--score-column", "kl",
            "--batch", "2", "--context", "10", "--engine", "transformers"]


@functools.cache
def _mount_namespaces() -> bool:
    """Whether ``unshare -rm`` may bind-mount a directory read-only here (a user and mount namespace of
    one process: no privilege needed where unprivileged user namespaces are allowed, nothing to undo)."""
    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0" && ! touch "$0/x"', d],
                               capture_output=True, timeout=30)
        return probe.returncode == 0


def read_only(directory: Path) -> list[str]:
    """Make ``directory`` (created) read-only for the command; returns the prefix of its command line.

    The faithful way is a read-only mount (``EROFS``, errno 30, as on a read-only volume): a bind mount in
    a mount namespace of its own, which vanishes with the command. Where namespaces are refused, mode 555
    does for a user other than root (``EACCES``); root writes through file modes, so then the case is
    :class:`Unavailable`."""
    directory.mkdir(parents=True, exist_ok=True)
    if _mount_namespaces():
        return ["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(directory)]
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    raise Unavailable("no read-only directory: unshare -rm is refused and root writes through file modes")


def more_gpus_than_present() -> str:
    """``8xH100`` where fewer than 8 CUDA devices are present (a CPU-only machine: the issue's case)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 8:
        raise Unavailable(f"{torch.cuda.device_count()} CUDA devices present: --cluster 8xH100 fits")
    return "8xH100"


def more_cores_than_present() -> str:
    """A CPU cluster of one rank more than this process may run on (``3xcpu`` on 2 cores)."""
    return f"{len(os.sched_getaffinity(0)) + 1}xcpu"


def _parquet_without_text(path: Path) -> Path:
    import pandas as pd

    pd.DataFrame({"content": ["def f():\n    return 1\n"] * 4}).to_parquet(path)
    return path


def _no_tokenizer(tmp: Path, parent: Path) -> Path:
    copy = copy_parent(tmp, parent)
    for f in copy.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            f.unlink()
    return copy


def _weights(tmp: Path, parent: Path, *, header: bool) -> Path:
    """A parent whose safetensors header is garbage (``header``) or whose file is cut in half."""
    copy = copy_parent(tmp, parent)
    path = copy / "model.safetensors"
    if header:
        with path.open("r+b") as f:
            f.write(b"\xff" * 64)  # the header length and the start of its JSON
    else:
        os.truncate(path, path.stat().st_size // 2)
    return copy


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


# --- the cases ------------------------------------------------------------------------------------------

NOT_MISLEADING = "^(?!.*{wrong})(?=.*(?:{right}))"
"""A message that says ``right`` and not the misleading ``wrong`` of the issue's point 8."""

CASES: list[Case] = [
    # 3. constraints are checked in preflight, against the parent's layers and the space's variants
    Case("constraint_layer_out_of_range", 3, lambda t, p: search(t, p, "--constraint", "layer[99] == parent"),
         r"layer\[99\]"),
    Case("constraint_unknown_variant", 3, lambda t, p: search(t, p, "--constraint", "layer[0] == parnt"),
         r"parnt"),
    Case("constraint_infeasible_total", 3, lambda t, p: search(t, p, "--constraint", "total(params) <= 1"),
         r"(?i)total\(params\)|infeasible"),
    # 4. --cluster against the devices and cores present
    Case("cluster_gpus_absent", 4, lambda t, p: search(t, p, "--cluster", more_gpus_than_present()),
         r"(?=.*--cluster)(?=.*xH100)"),
    Case("cluster_more_cores_than_present", 4, lambda t, p: search(t, p, "--cluster", more_cores_than_present()),
         r"(?=.*--cluster)(?=.*\dxcpu)"),
    # 5. tracebacks: OS and format errors
    Case("search_out_read_only", 5, lambda t, p: [*read_only(t / "ro"), *search(t, p, out="ro")],
         r"(?i)read-only|not writable|permission", quick=True),
    Case("solve_out_read_only", 5,
         lambda t, p: [*read_only(t / "ro"), *puzzle("solve", *solve_tables(t), "--out", str(t / "ro" / "arch.json"))],
         r"(?i)read-only|not writable|permission", quick=True),
    Case("export_out_read_only", 5, lambda t, p: [
        *read_only(t / "ro"), *puzzle("export", str(p), "--out", str(t / "ro" / "model"), "--engine", "transformers")],
         r"(?i)read-only|not writable|permission"),
    Case("out_under_a_file", 5, lambda t, p: search(t, p, out=f"{_write(t / 'FILE', 'mine').name}/sub"),
         r"(?i)not a directory|is a file"),
    Case("config_missing_num_hidden_layers", 5,
         lambda t, p: search(t, edit_config(t, p, lambda c: c.pop("num_hidden_layers"))), r"num_hidden_layers",
         quick=True),
    Case("config_hidden_size_a_string", 5,
         lambda t, p: search(t, edit_config(t, p, lambda c: c.update(hidden_size="64"))), r"hidden_size"),
    Case("binary_config", 5, lambda t, p: search(t, p, "--config", str(binary_file(t / "settings.yaml"))),
         r"(?=.*settings\.yaml)(?=.*(?i:binary|utf-?8|not text|text file))"),
    Case("binary_jsonl_data", 5, lambda t, p: search(t, p, "--data", str(binary_file(t / "corpus.jsonl"))),
         r"(?=.*corpus\.jsonl)(?=.*(?i:binary|utf-?8|not text|text file|invalid JSON))"),
    # 6. every check before the first write: weights, tokenizer, data
    Case("weights_header_corrupt", 6, lambda t, p: search(t, _weights(t, p, header=True)),
         r"(?=.*model\.safetensors)(?=.*(?i:header|not a safetensors))"),
    Case("weights_truncated", 6, lambda t, p: search(t, _weights(t, p, header=False)),
         r"(?=.*model\.safetensors)(?=.*(?i:truncat|cut short|incomplete))"),
    Case("tokenizer_missing", 6, lambda t, p: search(t, _no_tokenizer(t, p)), r"(?i)tokenizer"),
    Case("data_empty_file", 6, lambda t, p: search(t, p, "--data", str(_write(t / "empty.txt", ""))),
         r"(?=.*empty\.txt)(?=.*(?i:no document|empty))"),
    Case("data_jsonl_invalid_json", 6,
         lambda t, p: search(t, p, "--data", str(_write(t / "corpus.jsonl", "this is no json\n"))),
         r"(?=.*corpus\.jsonl)(?=.*invalid JSON)"),
    Case("data_jsonl_without_text", 6,
         lambda t, p: search(t, p, "--data", str(_write(t / "corpus.jsonl", '{"content": "x = 1"}\n' * 8))),
         r"(?=.*corpus\.jsonl)(?=.*'text')"),
    Case("data_parquet_without_text", 6,
         lambda t, p: search(t, p, "--data", str(_parquet_without_text(t / "corpus.parquet"))),
         r"(?=.*corpus\.parquet)(?=.*'text')"),
    # 7. --space values that produce no variant, refused with the widths they round to
    Case("space_ffn_fraction_without_a_width", 7,
         lambda t, p: search(t, p, "--space", str(_write(t / "space.yaml", "space: {ffn: {sizes: [0.3]}}\n"))),
         r"(?=.*0\.3)(?=.*(?i:ffn|width|size))"),
    Case("space_ffn_width_without_a_width", 7,
         lambda t, p: search(t, p, "--space", str(_write(t / "space.yaml", "space: {ffn: {sizes: [37]}}\n"))),
         r"(?=.*\b37\b)(?=.*(?i:ffn|width|size))"),
    # 8. messages that say what is wrong
    Case("solve_score_column_of_text", 8, lambda t, p: puzzle(
        "solve", *solve_tables(t, SCORES.replace(",0.1\n", ",high\n")), "--out", str(t / "arch.json")),
         NOT_MISLEADING.format(wrong="unknown score column", right=r"\bkl\b.*(?i:text|numer|number)"), quick=True),
    Case("config_a_directory", 8, lambda t, p: search(t, p, "--config", str(_directory(t / "conf"))),
         NOT_MISLEADING.format(wrong="does not exist", right="(?i:director)")),
    Case("solve_out_under_a_file", 8, lambda t, p: puzzle(
        "solve", *solve_tables(t), "--out", str(_write(t / "FILE", "mine") / "x.json")),
         NOT_MISLEADING.format(wrong="does not exist", right="(?i:not a directory|is a file)"), quick=True),
    Case("config_negative_head_count", 8,
         lambda t, p: search(t, edit_config(t, p, lambda c: c.update(num_attention_heads=-4))),
         NOT_MISLEADING.format(wrong=r"one of \[\]", right=r"num_attention_heads.*-4|-4.*num_attention_heads")),
]
"""Every single-command case of the issue's "Why" list that the tiny parent can make."""
