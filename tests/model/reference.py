"""An independent, deliberately naive forward pass used to check the runtime.

It shares no code with ``puzzle.model.modeling``: explicit loops over layers, repeat_interleave
for GQA, an explicit causal softmax, and RoPE written from the formula with complex numbers.
"""

from __future__ import annotations

import math

import torch


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope_complex(x, pos, inv_freq):  # x (B, n, T, hd), rotate pairs (i, i + hd/2)
    hd = x.shape[-1]
    z = torch.complex(x[..., : hd // 2].double(), x[..., hd // 2 :].double())
    angles = pos.double()[:, None] * inv_freq.double()[None, :]  # (T, hd/2)
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def reference_logits(state: dict, config, ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of the architecture ``config`` with weights ``state``, in float64."""
    sd = {k: v.double() for k, v in state.items()}
    nh, hd, eps = config.num_attention_heads, config.head_dim, config.rms_norm_eps
    x = sd["model.embed_tokens.weight"][ids]
    B, T, _ = x.shape
    pos = torch.arange(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def lin(name, y):
        out = y @ sd[f"{name}.weight"].T
        return out + sd[f"{name}.bias"] if f"{name}.bias" in sd else out

    for i, spec in enumerate(config.resolved_blocks()):
        p = f"model.layers.{i}"
        if spec["attention"] != "no_op":
            y = _rms(x, sd[f"{p}.input_layernorm.weight"], eps)
            if spec["attention"] == "linear":
                x = x + lin(f"{p}.self_attn.linear_attn", y)
            else:
                nkv = spec["num_key_value_heads"]
                q = lin(f"{p}.self_attn.q_proj", y).view(B, T, nh, hd).transpose(1, 2)
                k = lin(f"{p}.self_attn.k_proj", y).view(B, T, nkv, hd).transpose(1, 2)
                v = lin(f"{p}.self_attn.v_proj", y).view(B, T, nkv, hd).transpose(1, 2)
                q, k = _rope_complex(q, pos, inv_freq), _rope_complex(k, pos, inv_freq)
                k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
                scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
                scores = scores.masked_fill(~causal, float("-inf"))
                att = scores.softmax(-1) @ v  # (B, nh, T, hd)
                x = x + lin(f"{p}.self_attn.o_proj", att.transpose(1, 2).reshape(B, T, nh * hd))
        if spec["ffn"] != "no_op":
            y = _rms(x, sd[f"{p}.post_attention_layernorm.weight"], eps)
            if spec["ffn"] == "linear":
                x = x + lin(f"{p}.mlp.linear_mlp", y)
            else:
                g, u = lin(f"{p}.mlp.gate_proj", y), lin(f"{p}.mlp.up_proj", y)
                x = x + lin(f"{p}.mlp.down_proj", g * torch.sigmoid(g) * u)
    x = _rms(x, sd["model.norm.weight"], eps)
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ head.T
