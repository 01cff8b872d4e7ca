"""The SwiGLU family: a narrower FFN keeping the parent's most important intermediate channels.

Channel ``c`` of the parent computes ``a_c = silu(gate_c . x) * (up_c . x)`` and writes
``a_c * down[:, c]`` into the residual stream. Its importance is ``mean_t |a_c| * ||down[:, c]||``,
measured on calibration activations (:mod:`block_library.calibration`). A variant of width ``m``
keeps the ``m`` most important channels in their original order; at the parent's width it is
the parent, exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from block_library.calibration import CalibrationStats
from block_library.variant import Variant
from puzzle.errors import ConfigError


def channel_importance(act_abs_mean: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """``mean |a_c| * ||down[:, c]||``: (m,) from (m,) activations and the (H, m) down projection."""
    return act_abs_mean.double() * down_weight.double().norm(dim=0)


def kept_channels(importance: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the ``width`` most important channels, in ascending order (ties: lower index)."""
    values = importance.detach().double().tolist()
    order = sorted(range(len(values)), key=lambda c: (-values[c], c))
    return torch.tensor(sorted(order[:width]), dtype=torch.long)


@torch.no_grad()
def init_swiglu(module: nn.Module, parent_block: nn.Module, variant: Variant, stats: CalibrationStats | None) -> None:
    """Copy the norm; copy the kept rows of gate/up and columns of down (and their biases)."""
    if parent_block.spec["ffn"] != "swiglu":
        raise ConfigError(f"layer {variant.layer}: a swiglu variant is initialized from a swiglu parent sub-block, "
                          f"but the parent's is {parent_block.spec['ffn']}")
    src, dst = parent_block.mlp, module.mlp
    m_parent, m = parent_block.spec["intermediate_size"], variant.config.intermediate_size
    if m > m_parent:
        raise ConfigError(f"layer {variant.layer}: swiglu:{m} is wider than the parent's {m_parent}; "
                          "the library only narrows FFNs")
    module.post_attention_layernorm.weight.copy_(parent_block.post_attention_layernorm.weight)
    if m == m_parent:
        keep = torch.arange(m)
    else:
        if stats is None or variant.layer not in stats.ffn_act_abs_sum:
            raise ConfigError(f"layer {variant.layer}: pruning the FFN needs calibration statistics")
        act = stats.ffn_act_abs_sum[variant.layer] / max(stats.tokens, 1)
        keep = kept_channels(channel_importance(act, src.down_proj.weight), m)
    dst.gate_proj.weight.copy_(src.gate_proj.weight[keep])
    dst.up_proj.weight.copy_(src.up_proj.weight[keep])
    dst.down_proj.weight.copy_(src.down_proj.weight[:, keep])
    if src.gate_proj.bias is not None:
        dst.gate_proj.bias.copy_(src.gate_proj.bias[keep])
        dst.up_proj.bias.copy_(src.up_proj.bias[keep])
        dst.down_proj.bias.copy_(src.down_proj.bias)
