"""Calibration statistics for initializing variants, gathered in one streamed parent pass.

* ``ffn_act_abs_sum[l]`` (m,): sum over tokens of ``|silu(gate x) * up x|`` per intermediate
  channel of layer ``l``'s FFN (for importance pruning, :mod:`block_library.ffn`);
* ``xtx[(l, sub)]`` (H, H) and ``xty[(l, sub)]`` (H, H), float64: ``X^T X`` and ``X^T Y`` with
  ``X`` the sub-block's normalized input and ``Y`` the parent sub-block's output (for the
  least-squares linear replacements, :mod:`block_library.linear`);
* ``ffn_gram[l]`` (m, m), float64: ``A^T A`` with ``A`` the FFN's intermediate activations
  ``silu(gate x) * up x`` (for the least-squares refit of a pruned FFN's down projection,
  ``bld.ffn_refit``, :mod:`block_library.ffn`).

Only what the search space needs is collected, and only for this process's layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from puzzle.model.modeling import RMSNorm


@dataclass
class CalibrationStats:
    tokens: int = 0
    """Calibration tokens seen."""
    ridge: float = 1e-3
    """Relative ridge term of the least-squares fits of linear variants."""
    ffn_ridge: float = 0.1
    """Relative ridge term of the FFN refit, towards the plain copy."""
    ffn_act_abs_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    xtx: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    xty: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    ffn_gram: dict[int, torch.Tensor] = field(default_factory=dict)


def normalized_input(block: torch.nn.Module, subblock: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The sub-block's normalized input: the parent's norm, or a unit-scale RMSNorm if it has none."""
    name = "input_layernorm" if subblock == "attention" else "post_attention_layernorm"
    if hasattr(block, name):
        return getattr(block, name)(x)
    return RMSNorm(x.shape[-1], eps).to(x.device, x.dtype)(x)


class StatsCollector:
    """A ``visit`` for :func:`block_library.teacher.run_pass` that accumulates the statistics.

    ``needs[l]`` is a set of ``"ffn_importance"``, ``"ffn_gram"``, ``"lsq:attention"``, ``"lsq:ffn"``.
    """

    def __init__(self, needs: dict[int, set[str]], *, eps: float, ridge: float, ffn_ridge: float = 0.1) -> None:
        self.needs, self.eps = needs, eps
        self.stats = CalibrationStats(ridge=ridge, ffn_ridge=ffn_ridge)

    @torch.no_grad()
    def __call__(self, l: int, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, ctx: dict, *, block: torch.nn.Module) -> None:
        need, s = self.needs.get(l, set()), self.stats
        if "lsq:attention" in need:
            self._lsq((l, "attention"), normalized_input(block, "attention", x, self.eps), h - x)
        if "lsq:ffn" in need:
            self._lsq((l, "ffn"), normalized_input(block, "ffn", h, self.eps), y - h)
        if need & {"ffn_importance", "ffn_gram"} and block.spec["ffn"] == "swiglu":
            xn = block.post_attention_layernorm(h)
            act = F.silu(block.mlp.gate_proj(xn)) * block.mlp.up_proj(xn)  # (B, T, m)
            if "ffn_importance" in need:
                total = act.abs().double().sum(dim=(0, 1)).cpu()
                s.ffn_act_abs_sum[l] = s.ffn_act_abs_sum.get(l, 0) + total
            if "ffn_gram" in need:
                a = act.reshape(-1, act.shape[-1]).double()  # (N, m)
                s.ffn_gram[l] = s.ffn_gram.get(l, 0) + (a.T @ a).cpu()

    def count(self, tokens: int) -> None:
        self.stats.tokens += tokens

    def _lsq(self, key: tuple[int, str], xn: torch.Tensor, delta: torch.Tensor) -> None:
        X = xn.reshape(-1, xn.shape[-1]).double()  # (N, H)
        Y = delta.reshape(-1, delta.shape[-1]).double()  # (N, H)
        s = self.stats
        s.xtx[key] = s.xtx.get(key, 0) + (X.T @ X).cpu()
        s.xty[key] = s.xty.get(key, 0) + (X.T @ Y).cpu()
