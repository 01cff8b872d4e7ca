"""The one architecture vocabulary: per-layer block configs.

A block is an attention sub-block followed by an FFN sub-block, each with a residual add::

    x ─┬─ norm ─ attention ─(+)─┬─ norm ─ ffn ─(+)─> out
       └────────────────────────┘└──────────────┘

Attention is one of
  * ``gqa``    grouped-query attention with ``num_key_value_heads`` (divides the query heads),
  * ``linear`` one bias-free hidden x hidden matrix applied to the normalized input,
  * ``no_op``  nothing (the block's residual passes through; no norm, no weights).

FFN is one of
  * ``swiglu`` gated MLP with ``intermediate_size``,
  * ``linear`` one bias-free hidden x hidden matrix applied to the normalized input,
  * ``no_op``  nothing.

Every stage (block library, scoring, profiler, MIP, fusion, export) speaks these classes; the
DeciLM ``block_configs`` of an export are a serialization of them (see ``puzzle.export``).
This module imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.errors import SchemaError

ATTENTION_KINDS = ("gqa", "linear", "no_op")
FFN_KINDS = ("swiglu", "linear", "no_op")


def _reject_unknown(where: str, data: Mapping[str, Any], allowed: Iterable[str]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")


def _positive_int(where: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SchemaError(f"{where}: {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """The attention sub-block of one layer."""

    kind: str = "gqa"
    """One of ``gqa``, ``linear``, ``no_op``."""
    num_key_value_heads: int | None = None
    """Number of KV heads for ``gqa`` (must divide the query heads); ``None`` otherwise."""

    def __post_init__(self) -> None:
        if self.kind not in ATTENTION_KINDS:
            raise SchemaError(f"attention kind {self.kind!r} is not one of {ATTENTION_KINDS}")
        if self.kind == "gqa":
            _positive_int("gqa attention", "num_key_value_heads", self.num_key_value_heads)
        elif self.num_key_value_heads is not None:
            raise SchemaError(
                f"{self.kind} attention has no KV heads; drop num_key_value_heads "
                f"(got {self.num_key_value_heads})"
            )

    @classmethod
    def gqa(cls, num_key_value_heads: int) -> AttentionConfig:
        return cls(kind="gqa", num_key_value_heads=num_key_value_heads)

    @classmethod
    def linear(cls) -> AttentionConfig:
        return cls(kind="linear")

    @classmethod
    def no_op(cls) -> AttentionConfig:
        return cls(kind="no_op")

    @property
    def label(self) -> str:
        """Short name for tables: ``gqa:3``, ``linear``, ``no_op``."""
        return f"gqa:{self.num_key_value_heads}" if self.kind == "gqa" else self.kind

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "gqa":
            out["num_key_value_heads"] = self.num_key_value_heads
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttentionConfig:
        if not isinstance(data, Mapping):
            raise SchemaError(f"attention config must be a mapping, got {type(data).__name__}")
        _reject_unknown("attention config", data, ("kind", "num_key_value_heads"))
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class FFNConfig:
    """The FFN sub-block of one layer."""

    kind: str = "swiglu"
    """One of ``swiglu``, ``linear``, ``no_op``."""
    intermediate_size: int | None = None
    """Width of the gated MLP for ``swiglu``; ``None`` otherwise."""

    def __post_init__(self) -> None:
        if self.kind not in FFN_KINDS:
            raise SchemaError(f"ffn kind {self.kind!r} is not one of {FFN_KINDS}")
        if self.kind == "swiglu":
            _positive_int("swiglu ffn", "intermediate_size", self.intermediate_size)
        elif self.intermediate_size is not None:
            raise SchemaError(
                f"{self.kind} ffn has no intermediate size; drop intermediate_size "
                f"(got {self.intermediate_size})"
            )

    @classmethod
    def swiglu(cls, intermediate_size: int) -> FFNConfig:
        return cls(kind="swiglu", intermediate_size=intermediate_size)

    @classmethod
    def linear(cls) -> FFNConfig:
        return cls(kind="linear")

    @classmethod
    def no_op(cls) -> FFNConfig:
        return cls(kind="no_op")

    @property
    def label(self) -> str:
        """Short name for tables: ``swiglu:1536``, ``linear``, ``no_op``."""
        return f"swiglu:{self.intermediate_size}" if self.kind == "swiglu" else self.kind

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "swiglu":
            out["intermediate_size"] = self.intermediate_size
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FFNConfig:
        if not isinstance(data, Mapping):
            raise SchemaError(f"ffn config must be a mapping, got {type(data).__name__}")
        _reject_unknown("ffn config", data, ("kind", "intermediate_size"))
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """One decoder layer: an attention sub-block and an FFN sub-block."""

    attention: AttentionConfig
    ffn: FFNConfig

    def __post_init__(self) -> None:
        if not isinstance(self.attention, AttentionConfig):
            raise SchemaError(f"BlockConfig.attention must be an AttentionConfig, got {self.attention!r}")
        if not isinstance(self.ffn, FFNConfig):
            raise SchemaError(f"BlockConfig.ffn must be an FFNConfig, got {self.ffn!r}")

    @property
    def label(self) -> str:
        return f"{self.attention.label}|{self.ffn.label}"

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockConfig:
        if not isinstance(data, Mapping):
            raise SchemaError(f"block config must be a mapping, got {type(data).__name__}")
        _reject_unknown("block config", data, ("attention", "ffn"))
        missing = {"attention", "ffn"} - set(data)
        if missing:
            raise SchemaError(f"block config is missing {sorted(missing)}")
        return cls(
            attention=AttentionConfig.from_dict(data["attention"]),
            ffn=FFNConfig.from_dict(data["ffn"]),
        )


def validate_blocks(blocks: Sequence[BlockConfig], *, num_attention_heads: int) -> None:
    """Check every block against the model's query-head count; raise :class:`SchemaError`.

    The message names the layer, so a hand-written architecture file is easy to fix.
    """
    if len(blocks) == 0:
        raise SchemaError("an architecture needs at least one block")
    for i, block in enumerate(blocks):
        if not isinstance(block, BlockConfig):
            raise SchemaError(f"layer {i}: expected a BlockConfig, got {type(block).__name__}")
        k = block.attention.num_key_value_heads
        if block.attention.kind == "gqa" and (k > num_attention_heads or num_attention_heads % k):
            divisors = [d for d in range(1, num_attention_heads + 1) if num_attention_heads % d == 0]
            raise SchemaError(
                f"layer {i}: num_key_value_heads={k} must divide the {num_attention_heads} query "
                f"heads; choose one of {divisors}"
            )


def blocks_to_list(blocks: Sequence[BlockConfig]) -> list[dict[str, Any]]:
    return [b.to_dict() for b in blocks]


def blocks_from_list(data: Any) -> list[BlockConfig]:
    if not isinstance(data, list):
        raise SchemaError(f"block configs must be a list, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        try:
            out.append(BlockConfig.from_dict(item))
        except SchemaError as e:
            raise SchemaError(f"layer {i}: {e}") from None
        except TypeError as e:  # a wrong-typed field that dataclass init rejects
            raise SchemaError(f"layer {i}: {e}") from None
    return out


def save_blocks(blocks: Sequence[BlockConfig], path: str | Path) -> None:
    """Write block configs as JSON (``.json``) or YAML (``.yaml``/``.yml``), atomically."""
    from puzzle.io import atomic_write_text

    path = Path(path)
    data = {"block_configs": blocks_to_list(blocks)}
    if path.suffix in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    atomic_write_text(path, text)


def load_blocks(path: str | Path) -> list[BlockConfig]:
    """Read block configs from JSON or YAML: a list, or a mapping with a ``block_configs`` list."""
    from puzzle.io import one_line, read_user_text

    path = Path(path)
    text = read_user_text(path, what="architecture file", error=SchemaError)  # not a directory, text, readable
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise SchemaError(f"{path} is not valid {path.suffix.lstrip('.') or 'json'}: {one_line(str(e))}") from None
    if isinstance(data, Mapping):
        if "block_configs" not in data:
            raise SchemaError(f"{path}: expected a 'block_configs' key, found {sorted(data)}")
        data = data["block_configs"]
    try:
        return blocks_from_list(data)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from None
