"""Fixtures of the block-library tests: a tiny Llama that reads real text, and library configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from block_library import LibraryConfig

TINY_BLD = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_text_parent(tmp_path_factory, smollm2_source) -> Path:
    """A random 3-layer Llama (hidden 64, 4 heads / 2 KV heads, FFN 96) with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from puzzle.io import copy_tokenizer_files

    directory = tmp_path_factory.mktemp("tiny_text_parent")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_BLD, initializer_range=0.1)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    copy_tokenizer_files(smollm2_source.directory, directory)
    return directory


def tiny_config(**bld) -> LibraryConfig:
    """FFN widths in multiples of 16 (the parent is 96 wide), 64-token sequences, a few steps."""
    return LibraryConfig.from_dict({
        "space": {"ffn": {"multiple": 16}},
        "bld": {"tokens": 1024, "batch_size": 2, "calib_sequences": 4, "val_sequences": 4,
                "checkpoint_every": 2, "lr": 1e-3, **bld},
        "data": {"seq_len": 64},
    })
