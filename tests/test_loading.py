"""Runtime directories: save, classify, reload exactly, export from them."""

from __future__ import annotations

import json

import torch

from puzzle.export import export_decilm
from puzzle.loading import load_config, load_model, resolve_source, save_runtime
from tests.model.test_runtime import hetero_model


def test_runtime_directory_round_trip_and_export(tmp_path, tiny_llama_dir):
    model = hetero_model(tie_word_embeddings=True)
    save_runtime(model, tmp_path / "rt", source=resolve_source(tiny_llama_dir))
    cfg = json.loads((tmp_path / "rt" / "config.json").read_text())
    assert cfg["model_type"] == "puzzle" and cfg["architectures"] == ["PuzzleForCausalLM"]
    assert "id2label" not in cfg and len(cfg["block_configs"]) == 6
    assert resolve_source(tmp_path / "rt").kind == "runtime"
    assert load_config(tmp_path / "rt").blocks == model.config.blocks
    reloaded = load_model(tmp_path / "rt")
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    out = export_decilm(reloaded, tmp_path / "deci", source_dir=tmp_path / "rt")
    with torch.no_grad():
        assert torch.equal(load_model(out)(ids).logits, model(ids).logits)


def test_bfloat16_load_keeps_dtype(tiny_llama_dir):
    model = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
