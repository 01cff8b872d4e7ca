"""``PuzzleConfig``: the runtime's Hugging Face config, holding one block config per layer."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from puzzle.errors import SchemaError, UnsupportedArchitectureError
from puzzle.schema import BlockConfig, blocks_from_list, blocks_to_list, validate_blocks

_PARSED: dict[str, tuple[BlockConfig, ...]] = {}
"""``block_configs`` (by ``repr``) -> parsed blocks."""

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class PuzzleConfig(PreTrainedConfig):
    """Config of a heterogeneous Llama-family decoder (``model_type: puzzle``).

    Shared fields follow ``LlamaConfig``. ``intermediate_size`` and ``num_key_value_heads`` are the
    parent's reference sizes (the block library sizes its variants relative to them); each
    layer's actual sizes live in ``block_configs``.
    """

    model_type = "puzzle"

    def __init__(
        self,
        *,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_attention_heads: int = 32,
        head_dim: int | None = None,
        num_key_value_heads: int | None = None,
        intermediate_size: int = 11008,
        block_configs: list[dict[str, Any]] | None = None,
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
        parent_architecture: str | None = None,
        **kwargs: Any,
    ) -> None:
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
        if block_configs is None:
            n = num_hidden_layers or 2
            block = BlockConfig.from_dict(
                {"attention": {"kind": "gqa", "num_key_value_heads": self.num_key_value_heads},
                 "ffn": {"kind": "swiglu", "intermediate_size": intermediate_size}}
            )
            block_configs = [block.to_dict()] * n
        blocks = blocks_from_list(list(block_configs))
        if num_hidden_layers is not None and num_hidden_layers != len(blocks):
            raise SchemaError(f"num_hidden_layers={num_hidden_layers} but {len(blocks)} block configs given")
        validate_blocks(blocks, num_attention_heads=num_attention_heads)
        self.block_configs = blocks_to_list(blocks)
        """One ``{"attention": ..., "ffn": ...}`` dict per layer (see ``puzzle.schema``)."""
        self.num_hidden_layers = len(blocks)
        """Number of layers; always ``len(block_configs)``."""
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        """RoPE: ``rope_type`` (default, linear, llama3), ``rope_theta`` and the type's fields."""
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        self.tie_word_embeddings = tie_word_embeddings
        """Whether the LM head shares the token embedding matrix."""
        self.attention_bias = attention_bias
        """Bias on q/k/v/o projections (Llama semantics)."""
        self.qkv_bias = qkv_bias
        """If set, overrides the q/k/v bias alone (Qwen2: True with attention_bias False)."""
        self.mlp_bias = mlp_bias
        """Bias on the SwiGLU projections."""
        if hidden_act != "silu":
            raise UnsupportedArchitectureError(f"hidden_act {hidden_act!r} is not supported; only silu (SwiGLU)")
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.parent_architecture = parent_architecture
        """The parent's HF architecture name, for provenance."""
        super().__init__(**kwargs)

    @property
    def blocks(self) -> list[BlockConfig]:
        """The per-layer block configs as schema objects (parsed once per distinct ``block_configs``: the plan
        reads a 126-layer parent's blocks thousands of times)."""
        key = repr(self.block_configs)
        parsed = _PARSED.get(key)
        if parsed is None:
            if len(_PARSED) >= 256:
                _PARSED.clear()
            parsed = _PARSED[key] = tuple(blocks_from_list(self.block_configs))
        return list(parsed)

    def resolved_blocks(self) -> list[dict[str, Any]]:
        """Per-layer shapes in the plain form the modeling file reads."""
        return [
            {
                "attention": b.attention.kind,
                "num_key_value_heads": b.attention.num_key_value_heads,
                "ffn": b.ffn.kind,
                "intermediate_size": b.ffn.intermediate_size,
            }
            for b in self.blocks
        ]

    def with_blocks(self, blocks: list[BlockConfig]) -> PuzzleConfig:
        """A copy of this config with other per-layer blocks (same shared fields)."""
        data = self.to_dict()
        for key in ("model_type", "transformers_version", "architectures", "num_hidden_layers"):
            data.pop(key, None)
        data["block_configs"] = blocks_to_list(blocks)
        return PuzzleConfig(**data)
