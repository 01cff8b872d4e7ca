"""A variant: one candidate sub-block of one layer, and the module that computes it.

A variant module is the runtime's own ``DecoderBlock`` with the *other* sub-block set to
no-op, so it computes ``x + sub_block(norm(x))`` with exactly the runtime's code, and its
state-dict names (``input_layernorm.weight``, ``self_attn.k_proj.weight``,
``post_attention_layernorm.weight``, ``mlp.down_proj.weight`` ...) are the runtime's names under
``model.layers.{i}.``. Assembling a child is then a rename.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from puzzle.model.modeling import DecoderBlock
from puzzle.schema import AttentionConfig, FFNConfig

@dataclass(frozen=True)
class Variant:
    """Layer ``layer``'s ``subblock`` ("attention" or "ffn") as ``config``."""

    layer: int
    subblock: str
    config: AttentionConfig | FFNConfig
    is_parent: bool = False
    """True for the parent's own sub-block (exact by construction; never trained)."""

    @property
    def label(self) -> str:
        """``gqa:1``, ``swiglu:1024``, ``linear``, ``no_op``."""
        return self.config.label

    @property
    def key(self) -> str:
        """Unique id within a library, e.g. ``L007.ffn.swiglu:1024``."""
        return f"L{self.layer:03d}.{self.subblock}.{self.label}"

    @property
    def filename(self) -> str:
        """Its weight file in a library, e.g. ``L007.ffn.swiglu-1024.safetensors``."""
        return f"L{self.layer:03d}.{self.subblock}.{self.label.replace(':', '-')}.safetensors"

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def trainable(self) -> bool:
        """Trained by BLD: not the parent's own sub-block and not a no-op (nothing to train)."""
        return not self.is_parent and self.kind != "no_op"


def block_spec(variant: Variant) -> dict[str, Any]:
    """The runtime's resolved-block dict for a block holding only this variant."""
    if variant.subblock == "attention":
        a = variant.config
        return {"attention": a.kind, "num_key_value_heads": a.num_key_value_heads, "ffn": "no_op", "intermediate_size": None}
    f = variant.config
    return {"attention": "no_op", "num_key_value_heads": None, "ffn": f.kind, "intermediate_size": f.intermediate_size}


def build_module(variant: Variant, config: Any) -> nn.Module:
    """An uninitialized module computing ``x + variant(norm(x))`` (identity for a no-op)."""
    return DecoderBlock(config, block_spec(variant), cache_slot=0)
