"""OBS channel selection: each step removes the channel whose removal raises the ridge fit's error least."""

from __future__ import annotations

import itertools

import pytest
import torch

from puzzle.distill.channel_select import lstsq_error, obs_select
from puzzle.errors import ConfigError


def _problem(N: int = 96, D: int = 10, H: int = 4, seed: int = 0):  # noqa: ANN202
    """Correlated activations a (N, D), a target from a random wide map plus noise, a prior w0 (D, H)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    w0 = torch.randn(D, H, generator=g, dtype=torch.float64)
    t = a @ w0 + 0.3 * torch.randn(N, H, generator=g, dtype=torch.float64)
    return a, t, w0


def _objective(a, t, w0, keep, lam):  # noqa: ANN001, ANN202
    """The ridge fit on ``keep`` and its objective ``||a_S w - t||^2 + lam ||w - w0_S||^2``, solved directly."""
    s = a[:, keep]
    w = torch.linalg.solve(s.T @ s + lam * torch.eye(len(keep), dtype=torch.float64), s.T @ t + lam * w0[keep])
    return w, float((s @ w - t).pow(2).sum() + lam * (w - w0[keep]).pow(2).sum())


def test_one_at_a_time_it_is_greedy_backward_elimination_by_direct_refits():
    a, t, w0 = _problem()
    lam = 0.05 * float((a * a).sum(0).mean())
    keep, w = obs_select(a.T @ a, a.T @ t, w0, 4, lam)
    alive = list(range(a.shape[1]))
    while len(alive) > 4:  # brute force: try every removal, refit directly, keep the cheapest
        costs = {j: _objective(a, t, w0, [i for i in alive if i != j], lam)[1] for j in alive}
        alive.remove(min(costs, key=costs.get))
    assert keep.tolist() == alive
    torch.testing.assert_close(w, _objective(a, t, w0, alive, lam)[0])


def test_it_keeps_a_set_near_the_best_of_all_and_far_better_than_the_first_channels():
    a, t, w0 = _problem(D=12, seed=3)
    lam = 0.05 * float((a * a).sum(0).mean())
    g, c, tt = a.T @ a, a.T @ t, float(t.pow(2).sum())
    keep, w = obs_select(g, c, w0, 5, lam)
    err = lambda s: lstsq_error(g[s][:, s], c[s], tt, _objective(a, t, w0, s, lam)[0])  # noqa: E731
    every = sorted(err(list(s)) for s in itertools.combinations(range(12), 5))  # 792 subsets
    got = lstsq_error(g[keep][:, keep], c[keep], tt, w)
    assert got == pytest.approx(err(keep.tolist()))
    assert got <= every[len(every) // 100], (got, every[0])  # within the best 1% of the 792
    assert got < 0.8 * err(list(range(5)))


def test_steps_of_several_channels_cost_little_and_the_full_width_is_the_plain_ridge_fit():
    a, t, w0 = _problem(N=400, D=64, H=8, seed=5)
    lam = 0.05 * float((a * a).sum(0).mean())
    g, c, tt = a.T @ a, a.T @ t, float(t.pow(2).sum())
    one = obs_select(g, c, w0, 24, lam)
    two = obs_select(g, c, w0, 24, lam, group=2)  # 20 steps for 40 removals
    e1, e2 = (lstsq_error(g[k][:, k], c[k], tt, w) for k, w in (one, two))
    assert e2 <= 1.05 * e1, (e1, e2)  # measured 0.188 and 0.194
    keep, w = obs_select(g, c, w0, 64, lam)
    assert keep.tolist() == list(range(64))
    torch.testing.assert_close(w, _objective(a, t, w0, list(range(64)), lam)[0])


def test_bad_input_is_a_config_error():
    a, t, w0 = _problem()
    g, c = a.T @ a, a.T @ t
    for kw in ({"k": 0, "lam": 1.0}, {"k": 11, "lam": 1.0}, {"k": 4, "lam": 0.0}, {"k": 4, "lam": 1.0, "group": 0}):
        with pytest.raises(ConfigError, match="channel selection"):
            obs_select(g, c, w0, **kw)
    with pytest.raises(ConfigError, match="channel selection"):
        obs_select(g, c[:5], w0, 4, 1.0)
