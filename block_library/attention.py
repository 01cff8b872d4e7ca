"""The GQA family: attention with another number of KV heads, initialized by pooling the parent's.

Query head ``i`` of a parent with ``n_kv`` KV heads reads KV head ``i // (n_heads / n_kv)``.
With ``k < n_kv`` heads (``k`` divides ``n_kv``), new KV head ``j`` is the mean of the parent's
KV heads ``j*r .. j*r + r - 1`` (``r = n_kv / k``): exactly the heads its query heads read
before, so when those ``r`` heads are identical the pooled block equals the parent. With
``k > n_kv`` (a multiple), heads are repeated, which is exact. Query and output projections and
the norm are copied.
"""

from __future__ import annotations

import torch
from torch import nn

from block_library.calibration import CalibrationStats
from block_library.variant import Variant
from puzzle.errors import ConfigError


def pool_kv_heads(t: torch.Tensor, *, n_kv: int, k: int, head_dim: int) -> torch.Tensor:
    """Pool (or repeat) the head axis of a k/v weight ``(n_kv*hd, H)`` or bias ``(n_kv*hd,)``."""
    rest = t.shape[1:]
    heads = t.reshape(n_kv, head_dim, *rest)  # (n_kv, hd, ...)
    if k <= n_kv:
        if n_kv % k:
            raise ConfigError(f"cannot pool {n_kv} KV heads into {k}: {k} does not divide {n_kv}")
        out = heads.reshape(k, n_kv // k, head_dim, *rest).mean(dim=1)  # (k, hd, ...)
    else:
        if k % n_kv:
            raise ConfigError(f"cannot expand {n_kv} KV heads to {k}: {n_kv} does not divide {k}")
        out = heads.repeat_interleave(k // n_kv, dim=0)  # (k, hd, ...)
    return out.reshape(k * head_dim, *rest)


@torch.no_grad()
def init_gqa(module: nn.Module, parent_block: nn.Module, variant: Variant, stats: CalibrationStats | None) -> None:
    """Copy q/o projections and the norm; pool the k/v projections to the variant's KV heads."""
    if parent_block.spec["attention"] != "gqa":
        raise ConfigError(f"layer {variant.layer}: a gqa variant is initialized from a gqa parent sub-block, "
                          f"but the parent's is {parent_block.spec['attention']}")
    src, dst = parent_block.self_attn, module.self_attn
    module.input_layernorm.weight.copy_(parent_block.input_layernorm.weight)
    for name in ("q_proj", "o_proj"):
        getattr(dst, name).load_state_dict(getattr(src, name).state_dict())
    for name in ("k_proj", "v_proj"):
        s, d = getattr(src, name), getattr(dst, name)
        d.weight.copy_(pool_kv_heads(s.weight, n_kv=src.n_kv, k=dst.n_kv, head_dim=src.head_dim))
        if s.bias is not None:
            d.bias.copy_(pool_kv_heads(s.bias, n_kv=src.n_kv, k=dst.n_kv, head_dim=src.head_dim))
