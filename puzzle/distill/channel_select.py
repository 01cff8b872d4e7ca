"""Which of a wide FFN's channels a pruned one keeps: backward elimination on the least-squares fit (OBS).

A pruned SwiGLU FFN keeps ``k`` of the parent's ``D`` intermediate channels and a new down projection. Given
the parent's intermediate activations ``a`` (N, D) on some stream and a target ``t`` (N, H), the best down
projection for a kept set ``S`` is the ridge least-squares fit

    w_S = argmin ||a_S w - t||^2 + lam ||w - w0_S||^2 = (G_SS + lam I)^-1 (C_S + lam w0_S)

with ``G = a^T a`` (D, D), ``C = a^T t`` (D, H) and ``w0`` (D, H) the parent's down projection, transposed. Which
``S``: from all ``D`` channels, the one whose removal raises that error least goes, then the next, Optimal Brain
Surgeon style (as ZipLM does for structured pruning): with ``Hinv`` the inverse of the kept ``G + lam I`` and
``w`` the current fit, removing channel ``j`` (forcing its row to 0 and refitting the others) costs

    ||w_j||^2 / Hinv_jj - lam ||w0_j||^2

and updates ``w -= Hinv[:, j] w_j / Hinv_jj``, ``Hinv -= Hinv[:, j] Hinv[j, :] / Hinv_jj``. ``group`` channels go
per step (their joint update is exact; the choice among them uses each one's own cost). Float64 throughout;
``D^2 (D - k)`` multiply-adds in all.
"""

from __future__ import annotations

import torch

from puzzle.errors import ConfigError


def lstsq_error(g: torch.Tensor, c: torch.Tensor, tt: float, w: torch.Tensor) -> float:
    """``||a w - t||^2 / ||t||^2`` from ``G`` (k, k), ``C`` (k, H), ``||t||^2`` and ``w`` (k, H)."""
    return float(((g @ w) * w).sum() - 2 * (w * c).sum() + tt) / max(tt, 1e-30)


def obs_select(g: torch.Tensor, c: torch.Tensor, w0: torch.Tensor, k: int, lam: float,
               group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` kept channels (sorted indices, (k,)) and their ridge fit ``w_S`` (k, H), from ``G`` (D, D),
    ``C`` (D, H), ``w0`` (D, H) and the absolute ridge ``lam`` > 0, removing up to ``group`` channels a step."""
    D = g.shape[0]
    if not 0 < k <= D or not lam > 0 or group < 1 or c.shape[0] != D or w0.shape != c.shape:
        raise ConfigError(f"channel selection needs 0 < k <= D, lam > 0 and group >= 1 with G (D, D), C and w0 (D, H); "
                          f"got k={k}, D={D}, lam={lam}, group={group}, C {tuple(c.shape)}, w0 {tuple(w0.shape)}")
    g, c, w0 = g.double(), c.double(), w0.double()
    hs = g + lam * torch.eye(D, dtype=torch.float64, device=g.device)
    b = c + lam * w0
    # G + lam I is symmetric positive definite: inverted through its Cholesky factor (a third of an LU inverse's
    # work), and the inverse's transpose is the same matrix in row-major order (LAPACK returns it column-major),
    # which the updates below walk at memory speed
    factor, info = torch.linalg.cholesky_ex(hs)
    hinv = (torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.inv(hs)).mT
    w = hinv @ b  # (D, H)
    prior = lam * w0.pow(2).sum(1)  # (D,)
    alive = torch.ones(D, dtype=torch.bool, device=g.device)
    left = D - k
    while left > 0:
        cost = w.pow(2).sum(1) / hinv.diagonal().clamp_min(1e-300) - prior
        cost[~alive] = float("inf")
        j = torch.topk(cost, min(group, left), largest=False).indices  # (m,)
        hjj = hinv[j][:, j]  # (m, m)
        cols = hinv[:, j]  # (D, m)
        w.addmm_(cols, torch.linalg.solve(hjj, w[j]), alpha=-1)  # in place: no (D, H) or (D, D) temporary
        hinv.addmm_(cols, torch.linalg.solve(hjj, cols.T), alpha=-1)
        alive[j] = False
        w[j] = 0
        hinv[j] = 0
        hinv[:, j] = 0
        left -= len(j)
    keep = alive.nonzero().squeeze(1)
    return keep, torch.linalg.solve(hs[keep][:, keep], b[keep])  # a fresh solve: no drift from the updates
