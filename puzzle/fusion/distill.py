"""Optional short local distillation of a fused block against the sequential run it replaces.

The fused block starts as the exact parallel sum; training its weights on the segment's
calibration inputs ``x`` to reproduce the sequential output ``seq(x)`` recovers part of the
parallel approximation, at the cost of no longer being an exact reshuffle of the parent. The loss
is the normalized MSE of the block's update, ``|fused(x) - seq(x)|^2 / |seq(x) - x|^2``, the
same quantity :func:`puzzle.fusion.dependency.parallel_error` reports (squared).
"""

from __future__ import annotations

import logging
import math

import torch

from puzzle.errors import NumericalError

log = logging.getLogger(__name__)

_CTX = {"cos": None, "sin": None, "mask": None, "cache": None}


def distill_fused_block(block: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, *, steps: int,
                        lr: float = 1e-4, batch: int = 2, seed: int = 0) -> list[float]:
    """Train ``block`` (a fused ``DecoderBlock``) in place for ``steps`` AdamW steps; return the losses.

    ``x`` (N, T, H): the segment's inputs; ``target`` (N, T, H): the sequential run's outputs.
    Raises :class:`NumericalError` on a non-finite loss (the block is left as it was before that step).
    """
    if steps <= 0:
        return []
    x, target = x.detach(), target.detach()
    energy = float((target - x).double().pow(2).mean())
    if energy == 0.0:
        return []
    params = [p for p in block.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    block.train()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
        with torch.enable_grad():
            out = block(x[idx], _CTX)  # (b, T, H)
            loss = (out - target[idx]).float().pow(2).mean() / energy
            if not math.isfinite(loss.item()):
                raise NumericalError(f"fused-block distillation: loss is {loss.item()} at step {step + 1}; "
                                     f"lower the learning rate (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(loss.item())
    for p in params:  # the last step's gradients would stay with the block as long as it lives
        p.grad = None
    block.eval()
    log.info("fused-block distillation: NMSE %.4g -> %.4g over %d steps", losses[0], losses[-1], steps)
    return losses
