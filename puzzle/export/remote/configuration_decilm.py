"""DeciLM / nemotron-nas config, written by the puzzle project for its exported checkpoints.

Self-contained (transformers + stdlib only): it is copied next to ``modeling_decilm.py`` in every
export. ``block_configs`` holds one entry per layer, as the published Nemotron configs write them::

    {"attention": {"n_heads_in_group": 3, "no_op": false, "replace_with_linear": false},
     "ffn": {"ffn_mult": 4.0, "no_op": false, "replace_with_linear": false}}

Entries become attribute objects (``config.block_configs[i].ffn.ffn_mult``), as vLLM reads them.
A SwiGLU's width is ``int(2 * ffn_mult * hidden_size / 3)`` rounded up to a multiple of 256 (the
rule vLLM, TensorRT-LLM and llama.cpp apply); an ``intermediate_size`` key, present only where
no ``ffn_mult`` reproduces the width, overrides it.

The fields that no layer changes are :class:`LlamaFamilyConfig`'s, which puzzle's runtime config
(``PuzzleConfig``) builds on too: they are written once, here, where an export needs them without puzzle.
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


class LlamaFamilyConfig(PreTrainedConfig):
    """A decoder whose layers each have their own attention and FFN block; the fields that no layer changes follow
    ``LlamaConfig``.

    A subclass names its ``model_type``, reads ``block_configs`` in its own vocabulary (:meth:`parse_blocks`) and
    gives the modeling file the per-layer shapes (:meth:`resolved_blocks`): :class:`DeciLMConfig` below, and
    puzzle's runtime ``PuzzleConfig`` (``puzzle.model.configuration``).
    """

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
        # The order of assignment is the order of to_dict(), hence of every config.json written: keep it.
        self.vocab_size = vocab_size
        """Number of token embeddings."""
        self.hidden_size = hidden_size
        """Width of the residual stream."""
        self.num_attention_heads = num_attention_heads
        """Query heads of every GQA layer."""
        self.head_dim = head_dim or hidden_size // num_attention_heads
        """Width of one attention head."""
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        """The parent's KV heads (reference; each layer's own count is in block_configs)."""
        self.intermediate_size = intermediate_size
        """The parent's FFN width (reference; each layer's own width is in block_configs)."""
        self.block_configs, self.num_hidden_layers = self.parse_blocks(block_configs, num_hidden_layers)
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        """RoPE: ``rope_type``, ``rope_theta`` and the type's fields."""
        self.tie_word_embeddings = tie_word_embeddings
        """Whether the LM head shares the token embedding matrix."""
        self.attention_bias = attention_bias
        """Bias on q/k/v/o projections (Llama semantics)."""
        self.qkv_bias = qkv_bias
        """If set, overrides the q/k/v bias alone (Qwen2: True with attention_bias False)."""
        self.mlp_bias = mlp_bias
        """Bias on the SwiGLU projections."""
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        for name, value in self.own_fields(kwargs).items():
            setattr(self, name, value)
        super().__init__(**kwargs)

    def parse_blocks(self, block_configs: list[Any] | None, num_hidden_layers: int | None) -> tuple[list[Any], int]:
        """``block_configs`` as this class holds them (validated), and the number of layers."""
        raise NotImplementedError

    def own_fields(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """This class's own fields, popped from ``kwargs`` and set after the shared ones; the place to check the
        shared fields too. None here."""
        return {}

    def resolved_blocks(self) -> list[dict[str, Any]]:
        """Per-layer shapes in the plain form the modeling file reads."""
        raise NotImplementedError


class DeciLMConfig(LlamaFamilyConfig):
    model_type = "nemotron-nas"

    def __init__(self, **kwargs: Any) -> None:
        if "rope_scaling" in kwargs or "rope_theta" in kwargs:  # published Nemotron configs (transformers v4)
            rope = dict(kwargs.pop("rope_scaling", None) or {})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = kwargs.pop("rope_theta", 10000.0)
            kwargs["rope_parameters"] = kwargs.get("rope_parameters") or rope
        super().__init__(**kwargs)

    def parse_blocks(self, block_configs: list[Any] | None,
                     num_hidden_layers: int | None) -> tuple[list[DeciBlockConfig], int]:
        blocks = [
            b if isinstance(b, DeciBlockConfig) else DeciBlockConfig.from_dict(b, f"block_configs[{i}]")
            for i, b in enumerate(block_configs or [])
        ]
        if num_hidden_layers is not None and blocks and num_hidden_layers != len(blocks):
            raise ValueError(f"num_hidden_layers={num_hidden_layers} but {len(blocks)} block_configs")
        return blocks, len(blocks) if blocks else (num_hidden_layers or 0)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out

    def resolved_blocks(self) -> list[dict[str, Any]]:
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
