"""Parents from a local Hugging Face directory: Llama, Mistral and Qwen2 (safetensors only).

The runtime uses the Llama weight names, so the weight map (:func:`hf_weight_source`, one runtime
tensor at a time) is the identity; this module translates the config and checks that nothing
unsupported is silently dropped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from puzzle.errors import CorruptArtifactError, ModelFilesError, UnsupportedArchitectureError
from puzzle.model import PuzzleConfig
from puzzle.model.weights import meta_model, runtime_weight_names

log = logging.getLogger(__name__)

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def read_config_json(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ModelFilesError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    from puzzle.io import read_user_text  # binary or unreadable: one line

    try:
        data = json.loads(read_user_text(path, what="model config", error=CorruptArtifactError))
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CorruptArtifactError(f"{path} must hold a JSON object")
    return data


def hf_architecture(cfg: dict[str, Any], where: str) -> str:
    """The supported architecture name of a parent config, or a clear error."""
    archs = cfg.get("architectures") or []
    found = [a for a in archs if a in SUPPORTED]
    if found:
        return found[0]
    by_type = {v: k for k, v in SUPPORTED.items()}
    if not archs and cfg.get("model_type") in by_type:
        return by_type[cfg["model_type"]]
    raise UnsupportedArchitectureError(
        f"{where}: architecture {archs or cfg.get('model_type')!r} is not supported as a parent; "
        f"supported: {', '.join(SUPPORTED)}"
    )


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from a transformers v5 (``rope_parameters``) or v4 (``rope_theta`` + ``rope_scaling``) config."""
    if cfg.get("rope_parameters"):
        rope = dict(cfg["rope_parameters"])
    else:
        rope = dict(cfg.get("rope_scaling") or {})
        rope["rope_theta"] = cfg.get("rope_theta", 10000.0)
    if "type" in rope and "rope_type" not in rope:  # v4 legacy key
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    return rope


def puzzle_config_from_hf(cfg: dict[str, Any], *, where: str = "config") -> PuzzleConfig:
    """Translate a Llama/Mistral/Qwen2 ``config.json`` dict into a homogeneous :class:`PuzzleConfig`."""
    arch = hf_architecture(cfg, where)
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
    if arch == "MistralForCausalLM" and cfg.get("sliding_window"):
        log.warning(
            "%s: Mistral sliding_window=%s is not modelled; attention is full, which is exact for "
            "sequences up to that length", where, cfg["sliding_window"],
        )
    if arch == "Qwen2ForCausalLM" and cfg.get("use_sliding_window"):
        raise UnsupportedArchitectureError(f"{where}: Qwen2 use_sliding_window=true is not supported")
    heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or heads
    layers = cfg["num_hidden_layers"]
    block = {
        "attention": {"kind": "gqa", "num_key_value_heads": n_kv},
        "ffn": {"kind": "swiglu", "intermediate_size": cfg["intermediate_size"]},
    }
    qwen = arch == "Qwen2ForCausalLM"
    return PuzzleConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        num_key_value_heads=n_kv,
        intermediate_size=cfg["intermediate_size"],
        block_configs=[block] * layers,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_parameters=_rope_parameters(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=False if qwen else bool(cfg.get("attention_bias", False)),
        qkv_bias=True if qwen else None,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        parent_architecture=arch,
    )


@dataclass(frozen=True)
class WeightSource:
    """Where one runtime tensor comes from in a checkpoint: the stored tensor(s) and how to combine them."""

    names: tuple[str, ...]
    """Checkpoint names read for this tensor."""
    transform: Callable[..., torch.Tensor] | None = None
    """``transform(*tensors)`` gives the runtime tensor; None: the one stored tensor as it is."""

    def read(self, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The runtime tensor, reading each stored tensor with ``get(name)``."""
        tensors = [get(n) for n in self.names]
        return self.transform(*tensors) if self.transform is not None else tensors[0]


def hf_weight_source(name: str, config: PuzzleConfig) -> WeightSource:
    """The checkpoint tensor(s) behind the runtime tensor ``name`` in a Llama/Mistral/Qwen2 checkpoint.

    The runtime uses Llama's weight names, so this is the identity (the embedded SmolLM2 cache is
    such a checkpoint too: transformers' GGUF reader already undoes llama.cpp's Q/K permutation).
    The one map for both the full load (:func:`hf_state_dict_to_runtime`) and per-tensor reads.
    """
    return WeightSource((name,))


def hf_ignored(name: str, config: PuzzleConfig) -> bool:
    """Checkpoint tensors the runtime does not read: rotary caches and a tied ``lm_head.weight``."""
    return "rotary_emb" in name or (config.tie_word_embeddings and name == "lm_head.weight")


def hf_state_dict_to_runtime(state: dict[str, Any], config: PuzzleConfig) -> dict[str, Any]:
    """A whole HF state dict in runtime names, through :func:`hf_weight_source`.

    Runtime tensors whose sources are missing are left out, and stored tensors that no runtime
    tensor reads (other than :func:`hf_ignored` ones) are kept, so the model builder reports both.
    """
    out, used = {}, set()
    for name in runtime_weight_names(meta_model(config)):
        src = hf_weight_source(name, config)
        if all(n in state for n in src.names):
            out[name] = src.read(state.__getitem__)
            used.update(src.names)
    out.update({k: v for k, v in state.items() if k not in used and not hf_ignored(k, config)})
    return out
