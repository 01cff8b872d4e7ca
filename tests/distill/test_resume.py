"""Checkpoints, resume, reuse of a complete run, and refusal of a directory holding other inputs."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from puzzle.distill import distill_child
from puzzle.distill import gkd as gkd_module
from puzzle.errors import ConfigError, StaleArtifactError
from tests.distill.tiny import CharTokenizer, child_of, small

CFG = dict(steps=8, checkpoint_every=3, val_every=4, lr=1e-3)


def test_an_interrupted_run_resumes_to_the_same_weights(parent, child, tok, tmp_path, caplog):
    a = distill_child(child, parent, tok, tmp_path / "a", small(**CFG), progress=False)

    def interrupt(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_child(child, parent, tok, tmp_path / "b", small(**CFG), progress=False, on_step=interrupt)
    state = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["data_position"] == 12
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["status"] == "running"
    assert not (tmp_path / "b" / "child").exists()

    with caplog.at_level(logging.INFO, logger="puzzle.distill.gkd"):
        b = distill_child(child, parent, tok, tmp_path / "b", small(**CFG), progress=False)
    assert "resuming GKD at step 3 of 8" in caplog.text
    assert b.manifest["resumed_at_step"] == 3
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k  # bit for bit: weights, AdamW state, data order
    assert list(b.curve.step) == list(range(9))  # every step once
    assert b.curve.equals(a.curve)
    assert b.final == a.final


def test_a_complete_run_is_reused_and_other_inputs_are_refused(parent, child, tok, tmp_path, monkeypatch):
    first = distill_child(child, parent, tok, tmp_path / "gkd", small(), progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("a complete run must not train again")

    monkeypatch.setattr(gkd_module, "batch_losses", no_training)
    again = distill_child(child, parent, tok, tmp_path / "gkd", small(checkpoint_every=2), progress=False)
    assert again.reused and not first.reused
    assert again.curve.equals(first.curve) and again.final == first.final
    for k, v in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k

    with pytest.raises(StaleArtifactError, match=r"config steps \(4 -> 5\).*--force"):
        distill_child(child, parent, tok, tmp_path / "gkd", small(steps=5), progress=False)
    with pytest.raises(StaleArtifactError, match=r"the child \(weights or architecture\)"):
        distill_child(child_of(parent, no_attention=(0,)), parent, tok, tmp_path / "gkd", small(), progress=False)
    class OtherTokenizer(CharTokenizer):
        def __call__(self, texts, **kwargs):
            return {"input_ids": [[ord(c) % 100 for c in t] for t in texts]}

    with pytest.raises(StaleArtifactError, match="the training tokens.*the validation tokens"):
        distill_child(child, parent, OtherTokenizer(), tmp_path / "gkd", small(), progress=False)

    monkeypatch.undo()
    forced = distill_child(child, parent, tok, tmp_path / "gkd", small(steps=5), force=True, progress=False)
    assert not forced.reused and list(forced.curve.step) == list(range(6))


def test_a_foreign_directory_is_refused(parent, child, tok, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="no GKD manifest"):
        distill_child(child, parent, tok, tmp_path / "x", small(), progress=False)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"
