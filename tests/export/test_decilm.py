"""DeciLM export: config format, ffn_mult rule, exact reload, trust_remote_code in a clean Python."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from puzzle.errors import ExportError
from puzzle.export import export_decilm, ffn_mult_for
from puzzle.export import decilm as decilm_mod
from puzzle.export.remote.configuration_decilm import ffn_mult_to_intermediate_size
from puzzle.loading import load_config, load_model
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig
from tests.conftest import requires_smollm2
from tests.model.test_runtime import hetero_model

REMOTE = Path(__file__).with_name("remote_load.py")


def vllm_intermediate_size(ffn_mult: float, hidden: int) -> int:
    """vLLM's nemotron_nas rule, written out independently of puzzle's copy."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


@pytest.mark.parametrize("hidden", [576, 2048, 4096, 8192, 16384])
def test_ffn_mult_reproduces_every_multiple_of_256(hidden):
    for size in range(256, 8 * hidden + 1, 256):
        mult, exact = ffn_mult_for(size, hidden)
        assert exact and vllm_intermediate_size(mult, hidden) == size, (hidden, size, mult)
        assert round(mult, 6) == mult  # survives NVIDIA's round(ffn_mult, 6)
        assert ffn_mult_to_intermediate_size(mult, hidden) == size
    assert ffn_mult_for(1536, 576) == (4.0, True)  # SmolLM2's parent FFN
    assert ffn_mult_for(14336, 4096) == (5.25, True)  # Llama-3.1-8B


def test_sizes_engines_cannot_express_are_flagged():
    mult, exact = ffn_mult_for(1000, 576)
    assert not exact and vllm_intermediate_size(mult, 576) == 1024


def test_block_configs_are_written_as_published_nemotron_configs():
    to = lambda a, f: decilm_mod.block_to_decilm(BlockConfig(attention=a, ffn=f), num_attention_heads=9, hidden_size=576)[0]  # noqa: E731
    assert to(AttentionConfig.gqa(3), FFNConfig.swiglu(768)) == {
        "attention": {"n_heads_in_group": 3, "no_op": False, "replace_with_linear": False},
        "ffn": {"ffn_mult": 2.0, "no_op": False, "replace_with_linear": False},
    }
    assert to(AttentionConfig.linear(), FFNConfig.no_op()) == {
        "attention": {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True},
        "ffn": {"ffn_mult": None, "no_op": True, "replace_with_linear": False},
    }
    entry = to(AttentionConfig.no_op(), FFNConfig.linear())
    assert entry["attention"] == {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
    assert entry["ffn"] == {"ffn_mult": None, "no_op": False, "replace_with_linear": True}
    assert isinstance(to(AttentionConfig.gqa(9), FFNConfig.swiglu(1536))["ffn"]["ffn_mult"], float)


def _export_hetero(tmp_path, **kw):
    model = hetero_model(**kw)
    out = export_decilm(model, tmp_path / "export")
    return model, out


def test_export_layout_and_exact_reload(tmp_path):
    model, out = _export_hetero(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
    assert {"config.json", "model.safetensors", "configuration_decilm.py", "modeling_decilm.py"} <= {
        p.name for p in out.iterdir()}
    names = set(load_file(str(out / "model.safetensors")))
    assert "model.layers.2.self_attn.linear_attn.weight" in names
    assert "model.layers.3.mlp.linear_mlp.weight" in names
    assert not any(n.startswith("model.layers.5.") for n in names)  # no-op: no weights, no norms
    assert "model.layers.0.input_layernorm.weight" not in names
    reloaded = load_model(out)
    assert reloaded.config.blocks == model.config.blocks
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def _remote_logits(out: Path, ids: torch.Tensor, tmp_path: Path) -> dict:
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    proc = subprocess.run(
        [sys.executable, str(REMOTE), str(out), str(tmp_path / "ids.safetensors"), str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "transformers_modules" in proc.stdout
    return load_file(str(tmp_path / "out.safetensors"))


@pytest.mark.slow  # about 10 s
def test_trust_remote_code_load_without_puzzle_gives_same_logits(tmp_path):
    model, out = _export_hetero(tmp_path, tie_word_embeddings=True)
    ids = torch.randint(0, 128, (2, 24))
    remote = _remote_logits(out, ids, tmp_path)
    with torch.no_grad():
        want = model(ids).logits
        want_gen = model.generate(ids[:1, :6], max_new_tokens=10, do_sample=False)
    torch.testing.assert_close(remote["logits"], want, atol=1e-5, rtol=0)
    assert torch.equal(remote["generated"], want_gen)


@requires_smollm2
def test_smollm2_export_loads_with_trust_remote_code(tmp_path, smollm2, smollm2_source, smollm2_tokenizer):
    out = export_decilm(smollm2, tmp_path / "smol", source_dir=smollm2_source.directory)
    assert (out / "tokenizer.json").is_file()
    ids = smollm2_tokenizer(["def add(a, b):\n    return a + b\n"], return_tensors="pt").input_ids
    remote = _remote_logits(out, ids, tmp_path)
    with torch.no_grad():
        want = smollm2(ids, use_cache=False).logits
    assert (remote["logits"] - want).abs().max().item() < 1e-4
    assert load_config(out).blocks == smollm2.config.blocks


def test_inexact_ffn_width_warns_and_still_reloads_exactly(tmp_path, caplog):
    blocks = [{"attention": {"kind": "gqa", "num_key_value_heads": 2}, "ffn": {"kind": "swiglu", "intermediate_size": 40}}]
    with caplog.at_level(logging.WARNING):
        model, out = _export_hetero(tmp_path, block_configs=blocks)
    assert "vLLM" in caplog.text and "[0]" in caplog.text
    ffn = json.loads((out / "config.json").read_text())["block_configs"][0]["ffn"]
    assert ffn["intermediate_size"] == 40 and isinstance(ffn["ffn_mult"], float)
    reloaded = load_model(out)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_refuses_to_overwrite_or_write_into_the_source(tmp_path, tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    with pytest.raises(ExportError, match="overlaps the source"):
        export_decilm(model, tiny_llama_dir, source_dir=tiny_llama_dir)
    with pytest.raises(ExportError, match="overlaps the source"):
        export_decilm(model, tiny_llama_dir / "sub", source_dir=tiny_llama_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not empty"):
        export_decilm(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user data"


def test_interrupted_export_leaves_nothing_behind(tmp_path, monkeypatch):
    model = hetero_model()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(decilm_mod, "configuration_source", boom)
    with pytest.raises(KeyboardInterrupt):
        export_decilm(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_published_style_config_parses(tmp_path):
    """A config as NVIDIA publishes it (v4 rope keys, extra null fields) maps to runtime blocks."""
    cfg = {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "hidden_size": 64,
        "num_attention_heads": 4, "vocab_size": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
        "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32, "rope_type": "llama3"},
        "block_configs": [
            {"attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False, "sparsify": None,
                           "window_length": None, "num_sink_tokens": None},
             "ffn": {"ffn_mult": 1.3, "no_op": False, "replace_with_linear": False, "sparsify": None}},
            {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
             "ffn": {"ffn_mult": None, "no_op": False, "replace_with_linear": True}},
        ],
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = load_config(tmp_path)
    assert [b.label for b in config.blocks] == ["gqa:2|swiglu:256", "no_op|linear"]
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    cfg["block_configs"][0]["attention"]["window_length"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="window_length"):
        load_config(tmp_path)
