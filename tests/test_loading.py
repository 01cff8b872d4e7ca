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


def test_a_tokenizer_is_loaded_once_and_anew_when_its_files_change(tmp_path, tiny_text_parent):
    import shutil

    from puzzle.loading import load_tokenizer

    d = tmp_path / "model"
    shutil.copytree(tiny_text_parent, d)
    first = load_tokenizer(d)
    assert load_tokenizer(str(d)) is first  # the same directory, unchanged files: the loaded one
    ids = first("def f(x):\n    return x")["input_ids"]
    cfg = d / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data["model_max_length"] = 12345
    cfg.write_text(json.dumps(data))  # a rewritten tokenizer file: loaded anew
    second = load_tokenizer(d)
    assert second is not first and second.model_max_length == 12345
    assert second("def f(x):\n    return x")["input_ids"] == ids


def test_frozen_heap_still_frees_what_the_block_creates():
    import gc
    import weakref

    from puzzle.peak import frozen_heap, release_memory

    class Node:
        pass

    before = Node()
    before.self = before  # a cycle from before the block: collected on entry, not kept frozen
    seen_before = weakref.ref(before)
    del before
    with frozen_heap():
        assert seen_before() is None
        with frozen_heap():  # nested: one freeze
            a = Node()
            a.self = a  # a cycle made inside: only the collector frees it
            seen = weakref.ref(a)
            del a
            release_memory()
            assert seen() is None
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
