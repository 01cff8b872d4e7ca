"""Cached teacher targets: with k = the vocabulary GKD trains the same weights as with a live parent; with a small k
the coarsened KL is a close lower bound and the child still learns; the file is reused only for the same inputs."""

from __future__ import annotations

import pytest
import torch

from puzzle.distill import distill_child
from puzzle.distill.gkd import gkd_train_ids
from puzzle.distill.losses import batch_losses
from puzzle.distill.teacher_cache import cached_kl, compute_targets, load_targets, teacher_targets
from puzzle.errors import ConfigError
from puzzle.scoring.metrics import next_token_logprobs
from tests.distill.tiny import VOCAB, small


def test_with_k_the_vocabulary_gkd_trains_the_same_weights(parent, child, tok, tmp_path):
    cfg = small(steps=3, lr=1e-3)
    ids = gkd_train_ids(cfg, tok)
    targets = teacher_targets(parent, ids, VOCAB, tmp_path / "t.safetensors", hidden_dtype=torch.float32)
    live = distill_child(child, parent, tok, tmp_path / "live", cfg, progress=False)
    cached = distill_child(child, parent, tok, tmp_path / "cached", cfg, progress=False, teacher=targets)
    for k, v in live.model.state_dict().items():
        torch.testing.assert_close(cached.model.state_dict()[k], v, atol=1e-5, rtol=0)
    for col in ("train_loss", "train_kl", "train_cos", "val_kl"):
        assert cached.curve[col].dropna().tolist() == pytest.approx(live.curve[col].dropna().tolist(), rel=1e-4), col
    assert cached.manifest["inputs"]["teacher_top_k"] == VOCAB and "teacher_top_k" not in live.manifest["inputs"]
    assert cached.manifest["train_tokens_per_s"] > 0


def test_a_small_k_is_a_lower_bound_that_grows_with_k_and_the_child_still_learns(parent, child, tok, tmp_path):
    cfg = small(steps=12, lr=1e-3)
    ids = gkd_train_ids(cfg, tok)
    targets = compute_targets(parent, ids, 16)
    assert targets.logp.shape == (ids.shape[0], 31, 16) and targets.hidden.dtype == torch.bfloat16
    with torch.no_grad():
        q = next_token_logprobs(child(input_ids=ids).logits)
        full = float(batch_losses(child, parent, ids, cfg, [(3, 3)])["kl"])
        coarse = [float(cached_kl(q, compute_targets(parent, ids, k))) / (ids.shape[0] * 31) for k in (4, 16, 64, VOCAB)]
    # the random parent's distributions are flat (a trained one's top 64 hold most of its mass: benchmarks/gkd_cache.py)
    assert 0 < coarse[0] < coarse[1] < coarse[2] < full and coarse[3] == pytest.approx(full, rel=1e-5)
    # the mass outside the top k is what the parent's softmax leaves: probabilities sum to one
    total = targets.logp.exp().sum(-1) + targets.rest.exp()
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
    result = distill_child(child, parent, tok, tmp_path / "gkd", cfg, progress=False,
                           teacher=teacher_targets(parent, ids, 16, tmp_path / "t.safetensors"))
    assert result.final["kl"] < 0.8 * result.initial["kl"]  # the exact validation KL falls


def test_the_file_is_reused_only_for_the_same_parent_tokens_and_k(parent, child, tok, tmp_path):
    cfg = small(steps=2)
    ids, path = gkd_train_ids(cfg, tok), tmp_path / "t.safetensors"
    first = teacher_targets(parent, ids, 8, path)
    stamp = path.stat().st_mtime_ns
    again = teacher_targets(parent, ids, 8, path)
    assert path.stat().st_mtime_ns == stamp and torch.equal(again.logp, first.logp) and again.key == first.key
    other_k = teacher_targets(parent, ids, 4, path)  # recomputed and replaced
    assert other_k.top_k == 4 and load_targets(path).top_k == 4
    with pytest.raises(ConfigError, match="other tokens or another parent"):  # targets of k=4 on other ids
        distill_child(child, parent, tok, tmp_path / "a", small(steps=2, seed=0, seq_len=16), progress=False,
                      teacher=other_k)
    with pytest.raises(ConfigError, match="hidden='final'"):
        distill_child(child, parent, tok, tmp_path / "b", small(steps=2, hidden="all"), progress=False, teacher=other_k)
    with pytest.raises(ConfigError, match="top_k"):
        compute_targets(parent, ids, 0)
    path.write_bytes(b"not a safetensors file")  # a damaged cache is computed again, not trusted
    assert torch.equal(teacher_targets(parent, ids, 4, path).logp, other_k.logp)
