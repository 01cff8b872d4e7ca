"""Local distillation of a fused block toward the sequential run it replaces."""

from __future__ import annotations

import pytest
import torch

from puzzle.errors import NumericalError
from puzzle.fusion import Segment, fuse_model
from puzzle.fusion.dependency import parallel_error, run_inputs
from puzzle.fusion.distill import distill_fused_block
from puzzle.fusion.fuse import sequential_reference
from tests.fusion.tiny import ids_for, tiny_model

SEG = Segment(1, 4)


def setup(n: int = 4):
    model = tiny_model()
    x = run_inputs(model, ids_for(seed=3, shape=(n, 8)), [SEG.start])[SEG.start]
    with torch.no_grad():
        target = sequential_reference(model, SEG, x)
    fused = fuse_model(model, [SEG])
    return model, fused, fused.model.layers[1], x, target


def params_of(block):
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def test_distillation_reduces_the_loss():
    model, _, block, x, target = setup()
    before = params_of(block)
    losses = distill_fused_block(block, x, target, steps=30, lr=1e-3)
    assert len(losses) == 30 and all(v >= 0 for v in losses)
    assert losses[-1] < losses[0]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    after = block.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained in place
    assert not block.training  # left in eval mode
    # the original model's layers are not what was trained
    assert model.model.layers[1].mlp.gate_proj.weight.shape[0] == 48


def test_first_loss_is_the_squared_parallel_error():
    """With one sequence every step sees all the data: the first loss is parallel_error**2."""
    model, _, block, x, target = setup(n=1)
    losses = distill_fused_block(block, x, target, steps=1, lr=1e-3)
    assert losses[0] == pytest.approx(parallel_error(model, SEG, x) ** 2, rel=1e-4)


def test_distillation_is_deterministic_for_a_seed():
    _, _, a, x, target = setup()
    _, _, b, _, _ = setup()
    la = distill_fused_block(a, x, target, steps=5, lr=1e-3, seed=4)
    lb = distill_fused_block(b, x, target, steps=5, lr=1e-3, seed=4)
    assert la == lb


def test_zero_steps_and_zero_update_do_nothing():
    _, _, block, x, target = setup()
    before = params_of(block)
    assert distill_fused_block(block, x, target, steps=0) == []
    assert distill_fused_block(block, x, target, steps=-3) == []
    assert distill_fused_block(block, x, x.clone(), steps=5) == []  # target == input: nothing to learn
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_loss_raises_and_leaves_block_untouched():
    _, _, block, x, target = setup()
    before = params_of(block)
    bad = target.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(NumericalError, match="learning rate"):
        distill_fused_block(block, x, bad, steps=3, lr=1e-3)
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
