"""GKD on a tiny random parent: it lowers the KL, leaves parent and child untouched, and checks its inputs."""

from __future__ import annotations

import math

import pytest
import torch

from puzzle.distill import distill_child
from puzzle.distill import gkd as gkd_module
from puzzle.errors import ConfigError, NumericalError
from puzzle.loading import load_model
from tests.distill.tiny import assert_same, child_of, small, snapshot, tiny_parent


def test_training_lowers_the_validation_kl_and_moves_neither_parent_nor_child(parent, child, tok, tmp_path):
    parent_before, child_before = snapshot(parent), snapshot(child)
    result = distill_child(child, parent, tok, tmp_path / "gkd", small(steps=20, lr=1e-3, val_every=10), progress=False)

    # the KL to the parent halves (0.256 -> 0.115 nats/token when written), top-1 and cosine improve
    assert result.initial["kl"] > 0.1
    assert result.final["kl"] < 0.6 * result.initial["kl"]
    assert result.final["top1"] > result.initial["top1"] + 0.1
    assert result.final["cos"] < 0.7 * result.initial["cos"]
    train = result.curve[result.curve.step > 0]
    assert train.train_loss.iloc[-5:].mean() < 0.9 * train.train_loss.iloc[:5].mean()
    assert list(result.curve.step) == list(range(21))
    assert list(result.curve.dropna(subset=["val_kl"]).step) == [0, 10, 20]  # before, every 10 steps, at the end
    # the loss is the weighted sum of its terms (lm_weight 0)
    row = train.iloc[0]
    assert row.train_loss == pytest.approx(row.train_kl + row.train_cos, rel=1e-6)

    assert_same(parent, parent_before)  # the teacher never moves
    assert_same(child, child_before)  # the child passed in is copied, not trained in place
    assert not parent.training and all(p.requires_grad for p in parent.parameters())

    saved = load_model(tmp_path / "gkd" / "child")
    assert saved.config.block_configs == child.config.block_configs
    for k, v in result.model.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k
    assert not any(torch.equal(child_before[k], v) for k, v in result.model.state_dict().items() if "norm" not in k)
    m = result.manifest
    assert m["status"] == "complete" and m["final"] == result.final and m["initial"] == result.initial
    assert not (tmp_path / "gkd" / "checkpoint").exists()


def test_a_child_identical_to_the_parent_starts_at_zero(parent, tok, tmp_path):
    result = distill_child(parent, parent, tok, tmp_path / "gkd", small(steps=1), progress=False)
    assert result.initial["kl"] == 0.0
    assert result.initial["top1"] == 1.0
    assert result.initial["cos"] == pytest.approx(0.0, abs=1e-12)
    assert result.initial["lm"] == pytest.approx(result.manifest["parent_val_lm"], abs=1e-12)
    assert result.curve.train_kl.iloc[1] == pytest.approx(0.0, abs=1e-6)  # nothing to learn at step 1


def test_lm_only_and_all_hidden_states(parent, child, tok, tmp_path):
    lm = distill_child(child, parent, tok, tmp_path / "lm", small(steps=3, kl_weight=0, cosine_weight=0, lm_weight=1),
                       progress=False)
    train = lm.curve[lm.curve.step > 0]
    assert (train.train_loss == train.train_lm).all()  # the only term
    assert train.train_kl.gt(0).all()  # still reported

    every = distill_child(child, parent, tok, tmp_path / "all", small(steps=3, hidden="all"), progress=False)
    assert every.manifest["inputs"]["layer_map"] == [[1, 1], [2, 2], [3, 3]]
    # the output of layer 0 is unchanged (layer 1 lost its attention), so the mean over 3 pairs is below the last one
    final = distill_child(child, parent, tok, tmp_path / "final", small(steps=3), progress=False)
    assert 0 < every.initial["cos"] < final.initial["cos"]


def test_layer_maps(parent, tok, tmp_path):
    shallow = tiny_parent(layers=2, seed=1)
    with pytest.raises(ConfigError, match="needs a layer map: the child has 2 layers and the parent 3"):
        distill_child(shallow, parent, tok, tmp_path / "a", small(hidden="all"), progress=False)
    with pytest.raises(ConfigError, match="out of range"):
        distill_child(shallow, parent, tok, tmp_path / "b", small(hidden="all"), layer_map=[(3, 3)], progress=False)
    with pytest.raises(ConfigError, match="only used with hidden='all'"):
        distill_child(shallow, parent, tok, tmp_path / "c", small(), layer_map=[(1, 1)], progress=False)
    assert not (tmp_path / "a").exists()  # refused before anything was written
    result = distill_child(shallow, parent, tok, tmp_path / "d", small(steps=2, hidden="all"),
                           layer_map=[(1, 1), (2, 3)], progress=False)
    assert result.manifest["inputs"]["layer_map"] == [[1, 1], [2, 3]]
    assert math.isfinite(result.final["kl"])


def test_a_nan_weight_is_a_numerical_error(parent, tok, tmp_path):
    child = child_of(parent)
    with torch.no_grad():
        child.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="step 0.*check its weights"):
        distill_child(child, parent, tok, tmp_path / "gkd", small(), progress=False)


def test_a_non_finite_loss_names_the_step_and_the_learning_rate(parent, child, tok, tmp_path, monkeypatch):
    real, calls = gkd_module.batch_losses, []

    def blows_up(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(gkd_module, "batch_losses", blows_up)
    with pytest.raises(NumericalError, match=r"step 3: the loss is (inf|nan).*lower the learning rate \(now"):
        distill_child(child, parent, tok, tmp_path / "gkd", small(), progress=False)


def test_micro_batches_accumulate_to_the_same_step(parent, child, tok, tmp_path):
    whole = distill_child(child, parent, tok, tmp_path / "whole", small(steps=3, lr=1e-3), progress=False)
    micro = distill_child(child, parent, tok, tmp_path / "micro", small(steps=3, lr=1e-3, micro_batch=1), progress=False)
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(micro.model.state_dict()[k], v, atol=1e-5, rtol=0)
    assert micro.curve.train_loss.iloc[1] == pytest.approx(whole.curve.train_loss.iloc[1], rel=1e-5)
