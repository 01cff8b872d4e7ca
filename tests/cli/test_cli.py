"""The `puzzle` command: inspect and export, help texts, and clean errors."""

from __future__ import annotations

import argparse

import json
import shutil
import subprocess

import pytest
from transformers import AutoModelForCausalLM

from puzzle.cli.main import build_parser, main
from tests.conftest import requires_smollm2


def test_help_lists_commands_and_every_subcommand_has_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "export" in out
    def check(parser, name):
        for action in parser._actions:
            assert action.help, f"{name}: {action.dest} has no help text"
            choices = getattr(action, "choices", None)
            for sub_name, sub_parser in (choices.items() if isinstance(choices, dict) else ()):
                if isinstance(sub_parser, argparse.ArgumentParser):
                    check(sub_parser, f"{name} {sub_name}")

    check(build_parser(), "puzzle")


def test_inspect_table_and_json(tiny_llama_dir, capsys):
    assert main(["inspect", str(tiny_llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "[hf:" in out and "total" in out and "swiglu" in out
    assert main(["inspect", str(tiny_llama_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["kv_heads"] for row in data["layers"]] == [2, 2]
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # transformers' own count
    assert data["totals"]["params"] == sum(p.numel() for p in reference.parameters())
    assert [row["params"] for row in data["layers"]] == [
        sum(p.numel() for p in layer.parameters()) for layer in reference.model.layers]


def test_export_then_inspect_the_export(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "deci"
    assert main(["export", str(tiny_llama_dir), "--out", str(out), "--dtype", "bfloat16", "--engine", "transformers"]) == 0
    assert "exported 2 layers (torch.bfloat16)" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "decilm" and len(data["layers"]) == 2
    assert main(["export", str(tiny_llama_dir), "--out", str(out), "--engine", "transformers"]) == 2  # exists: refused
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["inspect", "no-such-model"], "unknown model 'no-such-model'"),
    (["export", "no-such-model", "--out", "x"], "unknown model"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow  # SmolLM2 in a subprocess
@requires_smollm2
def test_console_script_inspects_the_embedded_parent(smollm2_source):
    exe = shutil.which("puzzle")
    assert exe, "the `puzzle` console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "inspect", "smollm2-135m"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "total 134.52M params" in proc.stdout
    assert proc.stdout.count(" gqa ") == 30
