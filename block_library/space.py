"""The search space: which attention and FFN variants each layer of a parent may take.

    # puzzle library build smollm2-135m --config space.yaml --out runs/lib
    space:
      attention:
        kv_heads: fewer        # every divisor of the query heads below the parent's KV heads; or a list
        linear: true
        no_op: true
      ffn:
        sizes: [0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]  # ratios (float) of the parent width, or ints
        multiple: 256          # sizes are rounded to a multiple of this (vLLM / DeciLM granularity)
        linear: true
        no_op: true
      overrides:               # per-layer lists replace the defaults for those layers
        - {layers: [0], attention: [parent]}
        - {layers: "28-29", ffn: [parent, "swiglu:1024", no_op]}

The parent's own sub-block is always a variant of its layer, even where an override does not list
it (its NMSE is 0 and it is never trained).
With the defaults, SmolLM2-135M (9 query / 3 KV heads, FFN 1536) gets attention {gqa:3 (parent),
gqa:1, linear, no_op} and FFN {1536 (parent), 1280, 1024, 768, 512, 256, linear, no_op}; a
Llama-3.1-8B-shaped parent (32 / 8 heads, FFN 14336) gets gqa {8, 4, 2, 1} and seven FFN widths
from 12544 down to 1792, every one a multiple of 256. This module imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from puzzle.engines import allowed_attention, allowed_ffn, engine_rules
from puzzle.errors import ConfigError
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

DEFAULT_FFN_SIZES = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125)


def _check_keys(where: str, data: Mapping[str, Any], allowed: Sequence[str]) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")


def _check_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class AttentionSpace:
    """Attention variants offered to every layer (besides the parent's own)."""

    kv_heads: str | tuple[int, ...] = "fewer"
    """``fewer``: every divisor of the query heads below the parent's KV heads; or explicit counts."""
    linear: bool = True
    """Offer a linear replacement (one hidden x hidden map, least-squares initialized)."""
    no_op: bool = True
    """Offer removing the attention sub-block."""

    def __post_init__(self) -> None:
        if isinstance(self.kv_heads, str):
            if self.kv_heads != "fewer":
                raise ConfigError(f"space.attention.kv_heads must be 'fewer' or a list of integers, got {self.kv_heads!r}")
        else:
            kv = tuple(self.kv_heads)
            bad = next((k for k in kv if not (isinstance(k, int) and not isinstance(k, bool) and k > 0)), None)
            if bad is not None:
                raise ConfigError(f"space.attention.kv_heads {list(kv)} holds {bad!r}: each KV-head count must be a "
                                  f"positive divisor of the query-head count, e.g. [2, 1] (or write kv_heads: fewer)")
            object.__setattr__(self, "kv_heads", kv)
        _check_bool("space.attention.linear", self.linear)
        _check_bool("space.attention.no_op", self.no_op)


@dataclass(frozen=True, kw_only=True)
class FFNSpace:
    """FFN variants offered to every layer (besides the parent's own)."""

    sizes: tuple[float | int, ...] = DEFAULT_FFN_SIZES
    """Widths: a float in (0, 1] is a ratio of the parent's width, an int an absolute width."""
    multiple: int = 256
    """Every width is rounded to the nearest multiple of this (ties down), at least one multiple."""
    linear: bool = True
    """Offer a linear replacement (one hidden x hidden map, least-squares initialized)."""
    no_op: bool = True
    """Offer removing the FFN sub-block."""

    def __post_init__(self) -> None:
        sizes = tuple(self.sizes)
        for s in sizes:
            ok_ratio = isinstance(s, float) and 0.0 < s <= 1.0
            ok_abs = isinstance(s, int) and not isinstance(s, bool) and s > 0
            if not (ok_ratio or ok_abs):
                raise ConfigError(f"space.ffn.sizes: {s!r} is neither a ratio in (0, 1] (a float) nor a positive width (an int)")
        object.__setattr__(self, "sizes", sizes)
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise ConfigError(f"space.ffn.multiple must be a positive integer, got {self.multiple!r}")
        _check_bool("space.ffn.linear", self.linear)
        _check_bool("space.ffn.no_op", self.no_op)

    def width(self, size: float | int, parent_width: int) -> int:
        """The width one of :attr:`sizes` rounds to under a parent ``parent_width`` wide (it may reach the parent's)."""
        raw = size * parent_width if isinstance(size, float) else size
        return max(1, math.ceil(raw / self.multiple - 0.5)) * self.multiple  # nearest, ties down

    def widths(self, parent_width: int) -> list[int]:
        """Distinct rounded widths below ``parent_width``, largest first."""
        out = {m for m in (self.width(s, parent_width) for s in self.sizes) if m < parent_width}
        return sorted(out, reverse=True)


def parse_variant(text: str, subblock: str) -> AttentionConfig | FFNConfig | str:
    """``gqa:2`` / ``linear`` / ``no_op`` / ``swiglu:1024`` / ``parent`` -> a config (or ``"parent"``)."""
    if not isinstance(text, str):
        text = str(text)
    t = text.strip()
    if t == "parent":
        return "parent"
    kind, _, arg = t.partition(":")
    try:
        if subblock == "attention":
            if kind == "gqa" and arg:
                return AttentionConfig.gqa(int(arg))
            if kind in ("linear", "no_op") and not arg:
                return AttentionConfig(kind=kind)
        else:
            if kind == "swiglu" and arg:
                return FFNConfig.swiglu(int(arg))
            if kind in ("linear", "no_op") and not arg:
                return FFNConfig(kind=kind)
    except ValueError:
        pass
    examples = "gqa:K, linear, no_op, parent" if subblock == "attention" else "swiglu:WIDTH, linear, no_op, parent"
    raise ConfigError(f"{subblock} variant {text!r} is not understood; write one of {examples}")


def _parse_layers(value: Any, num_layers: int | None) -> tuple[int, ...]:
    """``[0, 3]``, ``5`` or ``"2-5"`` (inclusive) -> layer indices."""
    if isinstance(value, int) and not isinstance(value, bool):
        items: list[Any] = [value]
    elif isinstance(value, str):
        items = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise ConfigError(f"space.overrides.layers must be a list, an int or a range like '2-5', got {value!r}")
    out: list[int] = []
    for it in items:
        if isinstance(it, str) and "-" in it.lstrip("-"):
            lo, hi = it.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            try:
                out.append(int(it))
            except (TypeError, ValueError):
                raise ConfigError(f"space.overrides.layers: {it!r} is not a layer index") from None
    if num_layers is not None:
        bad = [i for i in out if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"space.overrides.layers: {bad} out of range; the parent has layers 0..{num_layers - 1}")
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class LayerOverride:
    """Variant lists that replace the defaults on some layers."""

    layers: tuple[int, ...]
    """Layer indices, e.g. ``[0]`` or ``"28-29"``."""
    attention: tuple[str, ...] | None = None
    """Attention variants for these layers (``parent``, ``gqa:K``, ``linear``, ``no_op``); None keeps the default."""
    ffn: tuple[str, ...] | None = None
    """FFN variants for these layers (``parent``, ``swiglu:W``, ``linear``, ``no_op``); None keeps the default."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerOverride:
        _check_keys("space.overrides[]", data, ("layers", "attention", "ffn"))
        if "layers" not in data:
            raise ConfigError("space.overrides[]: every override needs 'layers'")
        lists = {}
        for sub in ("attention", "ffn"):
            if data.get(sub) is not None:
                v = data[sub]
                items = [v] if isinstance(v, str) else list(v)
                for it in items:
                    parse_variant(it, sub)  # validate early, with the message naming the variant
                lists[sub] = tuple(str(it) for it in items)
        return cls(layers=_parse_layers(data["layers"], None), **lists)


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Per-layer candidate variants: defaults for every layer plus per-layer overrides."""

    attention: AttentionSpace = field(default_factory=AttentionSpace)
    """Attention variants of every layer."""
    ffn: FFNSpace = field(default_factory=FFNSpace)
    """FFN variants of every layer."""
    overrides: tuple[LayerOverride, ...] = ()
    """Layer-specific lists, applied in order (a later one wins)."""
    engine: str | None = None
    """Offer only what this serving engine loads (:mod:`puzzle.engines`: ``vllm``, ``sglang``, ``trtllm``,
    ``llamacpp``, ``transformers``); None: every variant. The parent's own sub-blocks always stay."""

    def __post_init__(self) -> None:
        if self.engine is not None:
            engine_rules(self.engine)  # an unknown name: one line naming the choices

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SearchSpace:
        data = data or {}
        _check_keys("space", data, ("attention", "ffn", "overrides", "engine"))
        att = dict(data.get("attention") or {})
        _check_keys("space.attention", att, ("kv_heads", "linear", "no_op"))
        if isinstance(att.get("kv_heads"), list):
            att["kv_heads"] = tuple(att["kv_heads"])
        ffn = dict(data.get("ffn") or {})
        _check_keys("space.ffn", ffn, ("sizes", "multiple", "linear", "no_op"))
        if "sizes" in ffn:
            if not isinstance(ffn["sizes"], list):
                raise ConfigError(f"space.ffn.sizes must be a list, got {ffn['sizes']!r}")
            ffn["sizes"] = tuple(ffn["sizes"])
        overrides = data.get("overrides") or []
        if not isinstance(overrides, list):
            raise ConfigError("space.overrides must be a list of {layers, attention, ffn} mappings")
        engine = data.get("engine")
        if engine is not None and not isinstance(engine, str):
            raise ConfigError(f"space.engine must be an engine name, got {engine!r}")
        return cls(attention=AttentionSpace(**att), ffn=FFNSpace(**ffn),
                   overrides=tuple(LayerOverride.from_dict(o) for o in overrides), engine=engine)

    def to_dict(self) -> dict[str, Any]:
        kv = self.attention.kv_heads
        return {
            "attention": {"kv_heads": kv if isinstance(kv, str) else list(kv),
                          "linear": self.attention.linear, "no_op": self.attention.no_op},
            "ffn": {"sizes": list(self.ffn.sizes), "multiple": self.ffn.multiple,
                    "linear": self.ffn.linear, "no_op": self.ffn.no_op},
            "overrides": [
                {"layers": list(o.layers),
                 **({"attention": list(o.attention)} if o.attention is not None else {}),
                 **({"ffn": list(o.ffn)} if o.ffn is not None else {})}
                for o in self.overrides
            ],
            **({"engine": self.engine} if self.engine is not None else {}),
        }

    def layer_variants(self, parent_blocks: Sequence[BlockConfig], *, num_attention_heads: int) -> list[LayerVariants]:
        """The resolved candidate lists of every layer, the parent's own sub-block first."""
        n = len(parent_blocks)
        for o in self.overrides:
            _parse_layers(list(o.layers), n)  # range check against this parent
        out = []
        for i, pb in enumerate(parent_blocks):
            att = self._default_attention(pb.attention, num_attention_heads)
            ffn = self._default_ffn(pb.ffn)
            for o in self.overrides:
                if i in o.layers:
                    if o.attention is not None:
                        att = [parse_variant(t, "attention") for t in o.attention]
                    if o.ffn is not None:
                        ffn = [parse_variant(t, "ffn") for t in o.ffn]
            att_cfgs = _with_parent_first(att, pb.attention)
            for a in att_cfgs:
                if a.kind == "gqa" and (num_attention_heads < 1 or num_attention_heads % a.num_key_value_heads):
                    raise ConfigError(_kv_heads_message(i, a.num_key_value_heads, num_attention_heads))
            ffn_cfgs = _with_parent_first(ffn, pb.ffn)
            if self.engine is not None:
                att_cfgs, ffn_cfgs = _engine_filter(self.engine, i, att_cfgs, ffn_cfgs, pb)
            out.append(LayerVariants(layer=i, attention=att_cfgs, ffn=ffn_cfgs))
        return out

    def _default_attention(self, parent: AttentionConfig, nh: int) -> list[AttentionConfig | str]:
        out: list[AttentionConfig | str] = ["parent"]
        if parent.kind == "gqa":
            kv = self.attention.kv_heads
            ks = [d for d in range(1, parent.num_key_value_heads) if nh % d == 0 and parent.num_key_value_heads % d == 0] \
                if kv == "fewer" else list(kv)
            out += [AttentionConfig.gqa(k) for k in sorted(set(ks), reverse=True)]
        if self.attention.linear:
            out.append(AttentionConfig.linear())
        if self.attention.no_op:
            out.append(AttentionConfig.no_op())
        return out

    def _default_ffn(self, parent: FFNConfig) -> list[FFNConfig | str]:
        out: list[FFNConfig | str] = ["parent"]
        if parent.kind == "swiglu":
            out += [FFNConfig.swiglu(m) for m in self.ffn.widths(parent.intermediate_size)]
        if self.ffn.linear:
            out.append(FFNConfig.linear())
        if self.ffn.no_op:
            out.append(FFNConfig.no_op())
        return out


def _kv_heads_message(layer: int, kv: int, heads: int) -> str:
    """One line: ``kv`` KV heads do not divide ``heads`` query heads (a head count below 1 has no divisor to offer)."""
    if heads < 1:
        return (f"layer {layer}: the parent has {heads} query heads; num_attention_heads in its config.json must be "
                f"a positive integer")
    divisors = [d for d in range(1, heads + 1) if heads % d == 0]
    return f"layer {layer}: gqa:{kv} must divide the {heads} query heads; choose one of {divisors}"


def _engine_filter(engine: str, layer: int, att: list[AttentionConfig], ffn: list[FFNConfig],
                   parent: BlockConfig) -> tuple[list[AttentionConfig], list[FFNConfig]]:
    """Drop the variants ``engine`` cannot load. The parent's own (first) always stays: a parent the engine
    cannot load is refused where a run is planned (``puzzle.search.preflight.check_engine``) and by the MIP."""
    rules = engine_rules(engine)
    kv = parent.attention.num_key_value_heads
    return ([att[0]] + [a for a in att[1:] if allowed_attention(rules, layer, a, parent_kv_heads=kv)],
            [ffn[0]] + [f for f in ffn[1:] if allowed_ffn(rules, f)])


def _with_parent_first(items: Sequence[Any], parent: Any) -> list[Any]:
    """Resolve ``"parent"``, put the parent's config first (always there), drop duplicates."""
    resolved = [parent if it == "parent" else it for it in items]
    out = [parent]
    for it in resolved:
        if it not in out:
            out.append(it)
    return out


@dataclass(frozen=True)
class LayerVariants:
    """The candidates of one layer."""

    layer: int
    attention: list[AttentionConfig]
    """Attention candidates; the parent's own first."""
    ffn: list[FFNConfig]
    """FFN candidates; the parent's own first."""
