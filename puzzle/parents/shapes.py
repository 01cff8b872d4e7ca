"""Named shapes of well-known parents, for planning before any weights are downloaded.

    puzzle plan --model llama-3.1-70b --cluster 8xH100      # memory and time per stage, from the shape alone

Each entry is the ``config.json`` a Hugging Face directory of that model holds (the fields the
runtime reads), so a plan from a shape equals a plan from the real directory. A shape has no
weights: ``puzzle search`` needs a model directory; ``benchmarks/random_parent.py`` writes random
weights of a shape for scale tests.
"""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                          "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001,
                          "attention_bias": False, "mlp_bias": False, "rope_scaling": _LLAMA3_ROPE}

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {**_LLAMA, "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192, "tie_word_embeddings": True,
                     "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}},
    "llama-3.1-8b": {**_LLAMA, "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
                     "tie_word_embeddings": False},
    "llama-3.1-70b": {**_LLAMA, "num_hidden_layers": 80, "hidden_size": 8192, "num_attention_heads": 64,
                      "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 28672,
                      "tie_word_embeddings": False},
    "llama-3.1-405b": {**_LLAMA, "num_hidden_layers": 126, "hidden_size": 16384, "num_attention_heads": 128,
                       "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 53248,
                       "tie_word_embeddings": False},
}
"""Shape name -> the model's ``config.json`` (Meta's published configs)."""


def canonical_shape(name: str) -> str | None:
    """The shape a name refers to (case-insensitive; ``meta-llama/Llama-3.1-70B`` works too), or None."""
    key = str(name).strip().lower().split("/")[-1].removeprefix("meta-")
    key = key.removesuffix("-instruct")
    return key if key in SHAPES else None


def shape_config_json(name: str) -> dict[str, Any]:
    """The ``config.json`` dict of a named shape (a copy)."""
    import copy

    key = canonical_shape(name)
    if key is None:
        from puzzle.errors import UnknownModelError

        raise UnknownModelError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return copy.deepcopy(SHAPES[key])
