"""One learning-rate schedule and gradient clip for every trainer: library BLD, child-aware BLD and GKD."""

from __future__ import annotations

import pytest
import torch

from block_library.config import BLDConfig
from block_library.schedule import TrainingSchedule, lr_at
from puzzle.distill.child_bld import ChildBLDConfig
from puzzle.distill.config import GKDConfig


@pytest.mark.parametrize("config", [BLDConfig(lr=1e-3, warmup_fraction=0.1), GKDConfig(lr=1e-3, warmup_fraction=0.1),
                                    ChildBLDConfig(tokens=64, lr=1e-3, warmup_fraction=0.1)])
def test_every_training_config_reads_the_one_schedule(config):
    assert isinstance(config, TrainingSchedule)
    assert [config.lr_at(s, 100) for s in range(100)] == [lr_at(s, 100, 1e-3, 0.1, 0.1) for s in range(100)]


def test_the_clip_is_one_norm_over_the_parameters_and_0_disables_it():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.full((3,), 2.0), torch.full((1,), 2.0)  # one norm of 4
    GKDConfig(grad_clip=0.0).clip([a, b])
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(4.0)
    GKDConfig(grad_clip=1.0).clip([a, b])
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(1.0)
