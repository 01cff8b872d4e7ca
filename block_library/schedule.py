"""The learning-rate schedule and gradient clip that every trainer of puzzle uses: library BLD
(:class:`~block_library.config.BLDConfig`), child-aware BLD (:class:`~puzzle.distill.child_bld.ChildBLDConfig`)
and GKD (:class:`~puzzle.distill.config.GKDConfig`).

    lr(step) = lr * (step + 1) / warm                                        step < warm = warmup_fraction * steps
             = lr * (r + (1 - r) * (1 + cos(pi * (step - warm) / (steps - warm))) / 2)   after; r = min_lr_ratio

AdamW steps at ``lr(step)`` after the gradient norm is clipped to ``grad_clip`` (0: no clip).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def lr_at(step: int, total: int, lr: float, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Linear warmup over ``warmup_fraction * total`` steps, then cosine to ``min_lr_ratio * lr``."""
    warm = max(1, round(warmup_fraction * total)) if warmup_fraction > 0 else 0
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class TrainingSchedule:
    """Mixin of the training configs: what their ``lr``, ``warmup_fraction``, ``min_lr_ratio`` and ``grad_clip``
    fields mean, and their use.

    Each config declares the four fields itself, with its own defaults and checks, where they have always been:
    a config's field order is the order of its ``to_dict()``, which manifests and hashes record.
    """

    lr: float
    """Peak AdamW learning rate."""
    warmup_fraction: float
    """Fraction of the steps spent warming up, linearly from 0."""
    min_lr_ratio: float
    """Final learning rate, after the cosine decay, as a fraction of ``lr``."""
    grad_clip: float
    """Gradient-norm clip; 0 disables."""

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of step ``step`` (from 0) of ``total``."""
        return lr_at(step, total, self.lr, self.warmup_fraction, self.min_lr_ratio)

    def clip(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Clip the gradient norm of ``parameters`` (one norm over all of them) to ``grad_clip``."""
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, self.grad_clip)
