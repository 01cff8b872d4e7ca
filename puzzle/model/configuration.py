"""``PuzzleConfig``: the runtime's Hugging Face config, holding one block config per layer."""

from __future__ import annotations

from typing import Any

from puzzle.errors import SchemaError, UnsupportedArchitectureError
from puzzle.export.remote.configuration_decilm import LlamaFamilyConfig
from puzzle.schema import BlockConfig, blocks_from_list, blocks_to_list, validate_blocks

_PARSED: dict[str, tuple[BlockConfig, ...]] = {}
"""``block_configs`` (by ``repr``) -> parsed blocks."""

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class PuzzleConfig(LlamaFamilyConfig):
    """Config of a heterogeneous Llama-family decoder (``model_type: puzzle``).

    Shared fields follow ``LlamaConfig`` (:class:`~puzzle.export.remote.configuration_decilm.LlamaFamilyConfig`,
    which the exported ``DeciLMConfig`` shares). ``intermediate_size`` and ``num_key_value_heads`` are the
    parent's reference sizes (the block library sizes its variants relative to them); each layer's actual sizes
    live in ``block_configs``: one ``{"attention": ..., "ffn": ...}`` dict per layer (see ``puzzle.schema``), and
    ``num_hidden_layers`` is always their number. ``parent_architecture``: the parent's HF architecture name, for
    provenance. RoPE types: default, linear, llama3; activation: silu (SwiGLU) only.
    """

    model_type = "puzzle"

    def __init__(self, *, intermediate_size: int = 11008, parent_architecture: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(intermediate_size=intermediate_size, parent_architecture=parent_architecture, **kwargs)

    def parse_blocks(self, block_configs: list[dict[str, Any]] | None,
                     num_hidden_layers: int | None) -> tuple[list[dict[str, Any]], int]:
        if block_configs is None:  # the parent's own block, ``num_hidden_layers`` times (2 by default)
            n = num_hidden_layers or 2
            block = BlockConfig.from_dict(
                {"attention": {"kind": "gqa", "num_key_value_heads": self.num_key_value_heads},
                 "ffn": {"kind": "swiglu", "intermediate_size": self.intermediate_size}}
            )
            block_configs = [block.to_dict()] * n
        blocks = blocks_from_list(list(block_configs))
        if num_hidden_layers is not None and num_hidden_layers != len(blocks):
            raise SchemaError(f"num_hidden_layers={num_hidden_layers} but {len(blocks)} block configs given")
        validate_blocks(blocks, num_attention_heads=self.num_attention_heads)
        return blocks_to_list(blocks), len(blocks)

    def own_fields(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.hidden_act != "silu":
            raise UnsupportedArchitectureError(f"hidden_act {self.hidden_act!r} is not supported; only silu (SwiGLU)")
        return {"parent_architecture": kwargs.pop("parent_architecture", None)}

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
