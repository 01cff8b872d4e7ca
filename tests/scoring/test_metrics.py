"""KL, loss delta and top-1 agreement from log-prob chunks, against a direct float64 computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from puzzle.scoring.metrics import TokenSums, compare_logits, next_token_logprobs


def _reference(parent_logits: torch.Tensor, child_logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    p = F.log_softmax(parent_logits[:, :-1].double(), -1)  # (B, T-1, V)
    q = F.log_softmax(child_logits[:, :-1].double(), -1)
    labels = ids[:, 1:, None]
    kl = (p.exp() * (p - q)).sum(-1).mean()
    delta = (-q.gather(-1, labels) + p.gather(-1, labels)).mean()
    agree = (p.argmax(-1) == q.argmax(-1)).double().mean()
    return {"kl": float(kl), "loss_delta": float(delta), "top1_agreement": float(agree)}


def test_chunked_sums_match_a_float64_reference():
    torch.manual_seed(0)
    B, T, V = 6, 17, 1000
    parent = torch.randn(B, T, V) * 3
    child = parent + torch.randn(B, T, V)  # a child that often, not always, agrees with the parent
    ids = torch.randint(0, V, (B, T))
    sums = TokenSums()
    for s in range(0, B, 4):  # two uneven chunks of sequences
        sums.add(next_token_logprobs(parent[s:s + 4]), next_token_logprobs(child[s:s + 4]), ids[s:s + 4, 1:])
    got, ref = sums.means(), _reference(parent, child, ids)
    assert sums.tokens == B * (T - 1)
    assert 0.05 < ref["top1_agreement"] < 0.95
    assert got["kl"] == pytest.approx(ref["kl"], rel=1e-5)
    assert got["loss_delta"] == pytest.approx(ref["loss_delta"], rel=1e-5, abs=1e-6)
    assert got["top1_agreement"] == ref["top1_agreement"]
    assert compare_logits(parent, child, ids)["kl"] == pytest.approx(ref["kl"], rel=1e-5)


def test_identical_logits_give_exactly_zero():
    torch.manual_seed(1)
    logits, ids = torch.randn(2, 9, 500) * 4, torch.randint(0, 500, (2, 9))
    assert compare_logits(logits, logits.clone(), ids) == {"kl": 0.0, "loss_delta": 0.0, "top1_agreement": 1.0}
