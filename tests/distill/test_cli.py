"""``puzzle distill`` on a tiny parent with SmolLM2's tokenizer and a child with one attention removed."""

from __future__ import annotations

import json

import pytest

from puzzle.cli.main import main
from puzzle.fusion.derive import derive_model, without_attention
from puzzle.loading import load_model, load_tokenizer, resolve_source, save_runtime
from tests.conftest import requires_smollm2

pytestmark = requires_smollm2


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["distill", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--parent", "--out", "--config", "--data", "--steps", "--batch", "--micro-batch", "--seq-len", "--lr",
                 "--kl-weight", "--cosine-weight", "--lm-weight", "--hidden", "--layer-map", "--val-sequences",
                 "--val-every", "--checkpoint-every", "--seed", "--device", "--force", "--no-progress"):
        assert flag in text, flag


def test_distill_a_child_directory(tiny_text_parent, tmp_path, capsys):
    src = resolve_source(tiny_text_parent)
    parent = load_model(src)
    child_dir = save_runtime(derive_model(parent, without_attention(parent.config.blocks, [1])), tmp_path / "child",
                             source=src)
    out = tmp_path / "gkd"
    args = ["distill", str(child_dir), "--parent", str(tiny_text_parent), "--out", str(out), "--steps", "3",
            "--batch", "2", "--micro-batch", "1", "--seq-len", "32", "--val-sequences", "2", "--lr", "1e-3",
            "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "validation (2 x 32 tokens): KL" in text and str(out / "child") in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["micro_batch"] == 1
    assert manifest["final"]["kl"] < manifest["initial"]["kl"]

    saved = load_model(out / "child")
    assert saved.config.block_configs == load_model(child_dir).config.block_configs
    assert load_tokenizer(out / "child")("def f():").input_ids == load_tokenizer(src)("def f():").input_ids

    assert main(args) == 0  # complete: reused
    assert "already complete" in capsys.readouterr().out
    assert main([*args[:6], "--steps", "4", *args[8:]]) == 2  # other inputs, no --force
    assert "config steps (3 -> 4)" in capsys.readouterr().err
