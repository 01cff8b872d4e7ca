"""The SwiGLU family: a narrower FFN keeping the parent's most important intermediate channels.

Channel ``c`` of the parent computes ``a_c = silu(gate_c . x) * (up_c . x)`` and writes
``a_c * down[:, c]`` into the residual stream. Its importance is ``mean_t |a_c| * ||down[:, c]||``,
measured on calibration activations (:mod:`block_library.calibration`). A variant of width ``m``
keeps the ``m`` most important channels in their original order; at the parent's width it is
the parent, exactly.

With ``bld.ffn_refit`` the kept channels' down projection is refit by least squares to what the whole FFN
writes, on the calibration tokens: with ``G = A^T A`` the Gram matrix of the intermediate activations, ``K``
the kept channels and ``D`` the dropped ones,

    down_K' = argmin ||A down^T - A_K d^T||^2 + lam ||d - down_K||^2 = down_K + down_D G_DK (G_KK + lam I)^-1

(``lam = ridge * mean diag G_KK``): the dropped channels' output is re-expressed through the kept ones where
they correlate, and the ridge pulls towards the plain copy where the tokens say little. On SmolLM2-135M
(``benchmarks/ffn_refit.py``: every FFN pruned alike, untrained, the library's 16 x 256 calibration tokens,
``bld.ffn_ridge`` 0.1) it lowers the held-out KL to the parent from 0.510 / 1.453 / 3.441 to 0.385 / 0.904 /
1.796 at 3/4, 1/2 and 1/4 of the width.
"""

from __future__ import annotations

import torch
from torch import nn

from block_library.calibration import CalibrationStats
from block_library.linear import ridge_lambda
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


def refit_down(down: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """The kept channels' least-squares down projection (H, k) from the parent's ``down`` (H, m), the
    activations' Gram matrix ``gram`` (m, m) and the kept channels ``keep`` (k,), ridge towards ``down[:, keep]``."""
    m = down.shape[1]
    if gram.shape != (m, m):
        raise ConfigError(f"the FFN refit needs a ({m}, {m}) Gram matrix, got {tuple(gram.shape)}")
    drop = torch.tensor(sorted(set(range(m)) - set(keep.tolist())), dtype=torch.long)
    W = down.detach().double()  # the solve runs where the weights are (the GPU in a GPU build); G stays on the host
    keep_d, drop_d = keep.to(W.device), drop.to(W.device)
    g_kk = gram[keep][:, keep].to(W.device, torch.float64)  # (k, k)
    g_dk = gram[drop][:, keep].to(W.device, torch.float64)  # (m - k, k)
    lam = ridge_lambda(g_kk, ridge) + 1e-12  # + a floor: a layer whose kept channels never fired
    a = g_kk + lam * torch.eye(len(keep), dtype=torch.float64, device=W.device)
    correction = torch.linalg.solve(a, (W[:, drop_d] @ g_dk).T).T  # (H, k): down_D G_DK (G_KK + lam)^-1
    return (W[:, keep_d] + correction).to(down.dtype)


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
    gram = stats.ffn_gram.get(variant.layer) if stats is not None and m < m_parent else None
    down = src.down_proj.weight[:, keep] if gram is None else refit_down(src.down_proj.weight, gram, keep, stats.ffn_ridge)
    dst.down_proj.weight.copy_(down)
    if src.gate_proj.bias is not None:
        dst.gate_proj.bias.copy_(src.gate_proj.bias[keep])
        dst.up_proj.bias.copy_(src.up_proj.bias[keep])
        dst.down_proj.bias.copy_(src.down_proj.bias)
