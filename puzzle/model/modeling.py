"""A heterogeneous Llama-family decoder: every layer has its own attention and FFN variant.

This file is self-contained on purpose (it imports only torch and transformers): ``puzzle
export`` ships it verbatim as ``modeling_decilm.py`` beside a DeciLM checkpoint, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` runs the same code in a
Python without puzzle. The config class is supplied by the importer (``PuzzleConfig`` in the
runtime, ``DeciLMConfig`` in an export); it must provide the usual Llama fields plus
``resolved_blocks()``, a list with one dict per layer::

    {"attention": "gqa" | "linear" | "no_op", "num_key_value_heads": int | None,
     "ffn": "swiglu" | "linear" | "no_op", "intermediate_size": int | None}

Residual path of one layer (a no-op sub-block has neither weights nor its norm)::

    x ──┬── input_layernorm ── self_attn ──(+)──┬── post_attention_layernorm ── mlp ──(+)──> out
        └───────────────────────────────────────┘└───────────────────────────────────┘

Weight names are the Llama/DeciLM ones (``model.layers.{i}.self_attn.q_proj`` ...,
``self_attn.linear_attn`` and ``mlp.linear_mlp`` for linear replacements), so a Llama parent
loads with an identity map and an export is a plain save.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# ---------------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) for ``default``, ``linear`` and ``llama3`` RoPE."""
    base = float(rope["rope_theta"])
    # float32 throughout, in the order transformers uses, so parents reproduce to the last bit:
    # a 1-ulp difference here grows with the position. The explicit CPU device keeps this real
    # even under a `torch.device("meta")` context.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    kind = rope.get("rope_type", "default")
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    elif kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(is_medium, blended, inv_freq)
    else:
        raise ValueError(f"rope_type {kind!r} is not supported; supported: default, linear, llama3")
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions; holds no parameters or buffers (nothing to save or load)."""

    def __init__(self, rope: dict[str, Any], head_dim: int) -> None:
        super().__init__()
        self._inv_freq = rope_inverse_frequencies(rope, head_dim)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != position_ids.device:
            self._inv_freq = self._inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self._inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with `num_key_value_heads` KV heads, through SDPA."""

    def __init__(self, config: Any, num_key_value_heads: int, cache_slot: int) -> None:
        super().__init__()
        h, self.n_heads, self.head_dim = config.hidden_size, config.num_attention_heads, config.head_dim
        self.n_kv = num_key_value_heads
        self.cache_slot = cache_slot  # index among the model's attention layers, in its KV cache
        qkv_bias = config.qkv_bias if config.qkv_bias is not None else config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        cos, sin = ctx["cos"][:, None], ctx["sin"][:, None]  # (B, 1, T, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cache = ctx["cache"]
        if cache is not None:
            k, v = cache.update(k, v, self.cache_slot)  # (B, nkv, S, hd), S = past + T
        mask = ctx["mask"]
        if T == 1 and mask is None and self.n_kv != self.n_heads:
            # Decode: the g query heads sharing a KV head become g query rows of that head, so K and V
            # are read once per KV head instead of being expanded to every query head (which CPU SDPA
            # does with enable_gqa, making fewer KV heads no faster).
            g = self.n_heads // self.n_kv
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv, g, self.head_dim), k, v)  # (B, nkv, g, hd)
            return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv != self.n_heads
        )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class LinearAttention(nn.Module):
    """Attention replaced by one hidden x hidden map of the normalized input (no cache)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return self.linear_attn(x)


class SwiGLU(nn.Module):
    def __init__(self, config: Any, intermediate_size: int) -> None:
        super().__init__()
        h, m, bias = config.hidden_size, intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, m, bias=bias)
        self.up_proj = nn.Linear(h, m, bias=bias)
        self.down_proj = nn.Linear(m, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


class DecoderBlock(nn.Module):
    def __init__(self, config: Any, spec: dict[str, Any], cache_slot: int) -> None:
        super().__init__()
        self.spec = spec
        h, eps = config.hidden_size, config.rms_norm_eps
        if spec["attention"] != "no_op":
            self.input_layernorm = RMSNorm(h, eps)
            if spec["attention"] == "gqa":
                self.self_attn = Attention(config, spec["num_key_value_heads"], cache_slot)
            else:
                self.self_attn = LinearAttention(config)
        if spec["ffn"] != "no_op":
            self.post_attention_layernorm = RMSNorm(h, eps)
            self.mlp = SwiGLU(config, spec["intermediate_size"]) if spec["ffn"] == "swiglu" else LinearMLP(config)

    def forward(self, x: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:  # (B, T, H)
        if self.spec["attention"] != "no_op":
            x = x + self.self_attn(self.input_layernorm(x), ctx)
        if self.spec["ffn"] != "no_op":
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


def _attention_mask(
    attention_mask: torch.Tensor | None, past_len: int, T: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean SDPA mask (B or 1, 1, T, S), or None when plain causal attention is exact.

    A query row whose keys are all padding may attend to itself, so padded positions stay
    finite instead of turning into NaN that would leak through 0 * NaN in later layers.
    """
    S = past_len + T
    has_padding = attention_mask is not None and not bool(attention_mask[:, :S].all())
    if not has_padding and (past_len == 0 or T == 1):
        return None
    q_pos = torch.arange(past_len, S, device=device)[:, None]  # (T, 1) absolute positions
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if has_padding:
        allowed = allowed & attention_mask[:, None, None, :S].bool()  # (B, 1, T, S)
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


# ---------------------------------------------------------------------------------- model classes


class HeterogeneousPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderBlock"]
    _supports_sdpa = True
    _skip_keys_device_placement = ["past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class HeterogeneousModel(HeterogeneousPreTrainedModel):
    """Embeddings, the per-layer blocks and the final norm (no LM head)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        specs = config.resolved_blocks()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers, slot = [], 0  # attention layers own KV-cache slots 0, 1, ... in order; others none
        for spec in specs:
            layers.append(DecoderBlock(config, spec, slot))
            slot += spec["attention"] == "gqa"
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope_parameters, config.head_dim)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Cache | None, tuple[torch.Tensor, ...] | None]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if past_key_values is None:  # newer transformers (5.2x) name the cache `cache`
            past_key_values = kwargs.pop("cache", None)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        B, T, _ = x.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x.device)[None].expand(B, T)
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # (B, T, hd) each
        mask = _attention_mask(attention_mask, past_len, T, x.device)
        ctx = {"cos": cos, "sin": sin, "mask": mask, "cache": past_key_values if use_cache else None}
        hidden = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, ctx)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)
        return x, (past_key_values if use_cache else None), (tuple(hidden) if hidden is not None else None)


class HeterogeneousForCausalLM(HeterogeneousPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.model = HeterogeneousModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if past_key_values is None:  # newer transformers (5.2x) name the cache `cache`
            past_key_values = kwargs.pop("cache", None)
        x, cache, hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache, hidden_states=hidden)
