"""Held-out quality: perplexity against a hand-computed cross-entropy, and the parent comparison."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from puzzle.errors import ConfigError, DataError
from puzzle.evaluation import evaluate_quality
from puzzle.scoring.metrics import compare_logits
from tests.evaluation.conftest import VOCAB, tiny_model


def test_ppl_is_exp_of_the_cross_entropy(model, ids):
    q = evaluate_quality(model, ids, chunk=2)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.double()  # (5, 12, V)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert q["tokens"] == 5 * 11
    assert q["nll"] == pytest.approx(float(ce), rel=1e-6)
    assert q["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-6)
    assert abs(q["ppl"] - VOCAB) > 5  # not the uniform perplexity: a wide init makes peaked logits
    assert "kl" not in q


@pytest.mark.parametrize("same_object", [True, False])
def test_model_against_itself(model, ids, same_object):
    parent = model if same_object else copy.deepcopy(model)
    q = evaluate_quality(model, ids, parent=parent)
    assert q["kl"] == 0.0
    assert q["top1_agreement"] == 1.0
    assert q["loss_delta"] == 0.0
    assert q["parent_ppl"] == q["ppl"]


def test_perturbed_child_matches_compare_logits(model, ids):
    child = copy.deepcopy(model)
    with torch.no_grad():
        w = child.model.layers[0].mlp.down_proj.weight
        w.add_(0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2)))
    q = evaluate_quality(child, ids, parent=model, chunk=2)
    with torch.no_grad():
        ref = compare_logits(model(input_ids=ids, use_cache=False).logits,
                             child(input_ids=ids, use_cache=False).logits, ids)
    assert q["kl"] > 1e-3
    assert q["kl"] == pytest.approx(ref["kl"], rel=1e-6)
    assert q["loss_delta"] == pytest.approx(ref["loss_delta"], rel=1e-6)
    assert q["top1_agreement"] == ref["top1_agreement"] < 1.0
    assert q["nll"] - q["parent_nll"] == pytest.approx(q["loss_delta"], rel=1e-9)


def test_bad_inputs(model, ids):
    other = tiny_model()
    other.config.vocab_size = VOCAB + 1  # only the configs are compared before any forward
    with pytest.raises(ConfigError, match="vocabularies differ"):
        evaluate_quality(model, ids, parent=other)
    with pytest.raises(DataError, match="T >= 2"):
        evaluate_quality(model, ids[:, :1])

