"""Parents load into the runtime exactly: tiny Llama/Mistral/Qwen2 and the real SmolLM2-135M."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from puzzle.errors import (CorruptArtifactError, ModelFilesError, UnknownModelError, UnsafeCheckpointError,
                           UnsupportedArchitectureError)
from puzzle.loading import load_config, load_model, resolve_source
from tests.conftest import requires_smollm2

LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CASES = {
    "llama": ("llama", {}),
    "llama-tied-bias-llama3rope": ("llama", {"tie_word_embeddings": True, "attention_bias": True,
                                             "mlp_bias": True, "rope_parameters": LLAMA3}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False, "num_key_value_heads": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_parent_logits_and_greedy_match_transformers(case, tiny_parent_factory):
    kind, overrides = CASES[case]
    directory = tiny_parent_factory(kind, **overrides)
    ref = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model = load_model(directory)
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ref(ids).logits - model(ids).logits).abs().max().item()
        want = ref.generate(ids[:1, :8], max_new_tokens=16, do_sample=False)
        got = model.generate(ids[:1, :8], max_new_tokens=16, do_sample=False)
    assert diff < 1e-4
    assert torch.equal(want, got)
    assert model.config.parent_architecture == ref.config.architectures[0]


@requires_smollm2
def test_smollm2_logits_and_greedy_match_transformers_gguf(smollm2, smollm2_hf_from_gguf, smollm2_tokenizer):
    text = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "import os\nimport sys\n\nclass Path:\n"]
    enc = smollm2_tokenizer(text, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = smollm2_hf_from_gguf(**enc).logits
        got = smollm2(**enc, use_cache=False).logits
    mask = enc.attention_mask.bool()
    diff = (want - got).abs()[mask].max().item()
    print(f"SmolLM2-135M max |logit diff| vs transformers (fp32): {diff:.3g}")
    assert diff < 1e-4
    prompt = smollm2_tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        g_want = smollm2_hf_from_gguf.generate(prompt, max_new_tokens=24, do_sample=False)
        g_got = smollm2.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(g_want, g_got)
    cfg = smollm2.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 1536, True)


def test_unknown_name_lists_embedded_models():
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        resolve_source("no-such-model")


def test_a_hub_id_offline_and_not_cached_says_how_to_fetch_it(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # HF_HUB_OFFLINE=1: conftest.py
    with pytest.raises(UnknownModelError, match="not in the local hub cache and HF_HUB_OFFLINE is set: fetch it "
                                                "with `hf download meta-llama/Llama-3.1-8B`"):
        resolve_source("meta-llama/Llama-3.1-8B")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelFilesError, match="config.json"):
        resolve_source(tmp_path)


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFilesError, match="is a file"):
        resolve_source(tmp_path / "model.safetensors")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_names_supported_ones(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        load_config(d)


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "rope_type 'yarn'"),
])
def test_unsupported_options(tiny_llama_dir, tmp_path, field, value, match):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match=match):
        load_config(d)


def test_pickle_only_checkpoint_is_refused_without_unpickling(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "bin")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"this would be unpickled by torch.load")
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_model(d)


def test_missing_weights(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelFilesError, match="no weights"):
        load_model(d)


def test_truncated_weights_file(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptArtifactError, match="truncated"):
        load_model(d)


def test_weights_that_do_not_fit_the_config(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptArtifactError, match=r"mlp\.(down|gate|up)_proj\.weight: checkpoint shape"):
        load_model(d)


def test_corrupt_config_json(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "badjson")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CorruptArtifactError, match="not valid JSON"):
        resolve_source(d)
