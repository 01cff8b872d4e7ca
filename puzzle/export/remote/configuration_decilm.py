"""DeciLM / nemotron-nas config, written by the puzzle project for its exported checkpoints.

Self-contained (transformers + stdlib only): it is copied next to ``modeling_decilm.py`` in every
export. ``block_configs`` holds one entry per layer, as the published Nemotron configs write them::

    {"attention": {"n_heads_in_group": 3, "no_op": false, "replace_with_linear": false},
     "ffn": {"ffn_mult": 4.0, "no_op": false, "replace_with_linear": false}}

Entries become attribute objects (``config.block_configs[i].ffn.ffn_mult``), as vLLM reads them.
A SwiGLU's width is ``int(2 * ffn_mult * hidden_size / 3)`` rounded up to a multiple of 256 (the
rule vLLM, TensorRT-LLM and llama.cpp apply); an ``intermediate_size`` key, present only where
no ``ffn_mult`` reproduces the width, overrides it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedConfig

# Keys of published configs that this model does not implement; accepted while they are off.
_INERT_KEYS = {"sparsify", "window_length", "num_sink_tokens", "use_prefill_window_in_sink_attention",
               "unshifted_sink", "hidden_act"}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def _split_known(where: str, data: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if key in known:
            out[key] = value
        elif key in _INERT_KEYS and value in (None, False, "silu"):
            continue
        else:
            raise ValueError(f"{where}: unsupported key {key!r}={value!r}; supported: {known}")
    return out


@dataclasses.dataclass(frozen=True)
class DeciAttentionConfig:
    n_heads_in_group: int | None = None
    no_op: bool = False
    replace_with_linear: bool = False

    def __post_init__(self) -> None:
        if self.no_op and self.replace_with_linear:
            raise ValueError("attention cannot be both no_op and replace_with_linear")
        if not (self.no_op or self.replace_with_linear) and not self.n_heads_in_group:
            raise ValueError("a full attention block needs n_heads_in_group")


@dataclasses.dataclass(frozen=True)
class DeciFFNConfig:
    ffn_mult: float | None = None
    no_op: bool = False
    replace_with_linear: bool = False
    intermediate_size: int | None = None

    def __post_init__(self) -> None:
        if self.no_op and self.replace_with_linear:
            raise ValueError("ffn cannot be both no_op and replace_with_linear")
        if not (self.no_op or self.replace_with_linear) and self.ffn_mult is None and self.intermediate_size is None:
            raise ValueError("a SwiGLU ffn block needs ffn_mult")


@dataclasses.dataclass(frozen=True)
class DeciBlockConfig:
    attention: DeciAttentionConfig
    ffn: DeciFFNConfig

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "block") -> DeciBlockConfig:
        attention = _split_known(f"{where}.attention", dict(data.get("attention", {})),
                                 ("n_heads_in_group", "no_op", "replace_with_linear"))
        ffn = _split_known(f"{where}.ffn", dict(data.get("ffn", {})),
                           ("ffn_mult", "no_op", "replace_with_linear", "intermediate_size"))
        return cls(attention=DeciAttentionConfig(**attention), ffn=DeciFFNConfig(**ffn))

    def to_dict(self) -> dict[str, Any]:
        ffn = dataclasses.asdict(self.ffn)
        if ffn["intermediate_size"] is None:
            del ffn["intermediate_size"]
        return {"attention": dataclasses.asdict(self.attention), "ffn": ffn}


class DeciLMConfig(PreTrainedConfig):
    model_type = "nemotron-nas"

    def __init__(
        self,
        *,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_attention_heads: int = 32,
        head_dim: int | None = None,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        block_configs: list[Any] | None = None,
        num_hidden_layers: int | None = None,
        rms_norm_eps: float = 1e-5,
        max_position_embeddings: int = 4096,
        rope_parameters: dict[str, Any] | None = None,
        tie_word_embeddings: bool = False,
        attention_bias: bool = False,
        qkv_bias: bool | None = None,
        mlp_bias: bool = False,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        if "rope_scaling" in kwargs or "rope_theta" in kwargs:  # published Nemotron configs (transformers v4)
            rope = dict(kwargs.pop("rope_scaling", None) or {})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = kwargs.pop("rope_theta", 10000.0)
            rope_parameters = rope_parameters or rope
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        blocks = [
            b if isinstance(b, DeciBlockConfig) else DeciBlockConfig.from_dict(b, f"block_configs[{i}]")
            for i, b in enumerate(block_configs or [])
        ]
        if num_hidden_layers is not None and blocks and num_hidden_layers != len(blocks):
            raise ValueError(f"num_hidden_layers={num_hidden_layers} but {len(blocks)} block_configs")
        self.block_configs = blocks
        self.num_hidden_layers = len(blocks) if blocks else (num_hidden_layers or 0)
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.tie_word_embeddings = tie_word_embeddings
        self.attention_bias = attention_bias
        self.qkv_bias = qkv_bias
        self.mlp_bias = mlp_bias
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out

    def resolved_blocks(self) -> list[dict[str, Any]]:
        """Per-layer shapes in the plain form the modeling file reads."""
        out = []
        for i, b in enumerate(self.block_configs):
            a, f = b.attention, b.ffn
            if a.no_op or a.replace_with_linear:
                attention, n_kv = ("no_op" if a.no_op else "linear"), None
            else:
                if self.num_attention_heads % a.n_heads_in_group:
                    raise ValueError(f"layer {i}: n_heads_in_group={a.n_heads_in_group} does not divide "
                                     f"{self.num_attention_heads} heads")
                attention, n_kv = "gqa", self.num_attention_heads // a.n_heads_in_group
            if f.no_op or f.replace_with_linear:
                ffn, size = ("no_op" if f.no_op else "linear"), None
            else:
                ffn = "swiglu"
                size = f.intermediate_size or ffn_mult_to_intermediate_size(f.ffn_mult, self.hidden_size)
            out.append({"attention": attention, "num_key_value_heads": n_kv, "ffn": ffn, "intermediate_size": size})
        return out
