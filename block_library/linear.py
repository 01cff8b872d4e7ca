"""The linear family: a sub-block replaced by one hidden x hidden map, least-squares initialized.

With ``X`` the sub-block's normalized input (N, H) and ``Y`` the parent sub-block's output, the
residual delta (N, H), on calibration tokens, the map is the ridge solution

    W^T = argmin ||X W^T - Y||^2 + lam ||W||^2 = (X^T X + lam I)^-1 X^T Y,   lam = ridge * tr(X^T X) / H

computed from the streamed sums ``X^T X`` and ``X^T Y`` in float64 (:mod:`block_library.calibration`).
It equals ``torch.linalg.lstsq`` on ``[X; sqrt(lam) I] W^T = [Y; 0]``. The norm is the parent's.
"""

from __future__ import annotations

import torch
from torch import nn

from block_library.calibration import CalibrationStats
from block_library.variant import Variant
from puzzle.errors import ConfigError


def ridge_lambda(xtx: torch.Tensor, ridge: float) -> float:
    """The absolute ridge term: ``ridge`` times the mean diagonal of ``X^T X``."""
    return float(ridge * torch.diagonal(xtx).mean())


def ridge_solve(xtx: torch.Tensor, xty: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W`` (out, in), as ``nn.Linear`` stores it, from ``X^T X`` (in, in) and ``X^T Y`` (in, out)."""
    xtx, xty = xtx.double(), xty.double()
    lam = ridge_lambda(xtx, ridge)
    a = xtx + lam * torch.eye(xtx.shape[0], dtype=torch.float64)
    return torch.linalg.solve(a, xty).T  # (out, in)


@torch.no_grad()
def init_linear(module: nn.Module, parent_block: nn.Module, variant: Variant, stats: CalibrationStats | None) -> None:
    """Copy the parent's norm (ones if it has none) and set the map to the ridge solution."""
    key = (variant.layer, variant.subblock)
    if stats is None or key not in stats.xtx:
        raise ConfigError(f"layer {variant.layer}: a linear {variant.subblock} needs calibration statistics")
    if variant.subblock == "attention":
        norm, linear, parent_norm = module.input_layernorm, module.self_attn.linear_attn, "input_layernorm"
    else:
        norm, linear, parent_norm = module.post_attention_layernorm, module.mlp.linear_mlp, "post_attention_layernorm"
    if hasattr(parent_block, parent_norm):
        norm.weight.copy_(getattr(parent_block, parent_norm).weight)
    else:
        norm.weight.fill_(1.0)
    linear.weight.copy_(ridge_solve(stats.xtx[key], stats.xty[key], stats.ridge).to(linear.weight.dtype))
