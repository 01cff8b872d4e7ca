"""How much each FFN of a run depends on the FFNs before it, measured on calibration data.

For a run entered by ``x_0`` (the residual stream before its first layer), the sequential model
computes ``f_k = FFN_k(norm_k(x_k))`` and ``x_{k+1} = x_k + f_k``. The dependency of layer j on
an earlier layer i of the run is how far FFN j's output turns when i's contribution is removed
from its input (FFN Fusion, arXiv 2503.18908, section 3)::

    d[i][j] = mean over tokens of  1 - cos( f_j , FFN_j(norm_j(x_j - f_i)) )        i < j

0 means FFN j does not notice block i at all: the two can run in parallel. A segment's score is
the mean of ``d`` over its pairs (:func:`puzzle.fusion.runs.segment_score`). Alongside, the
*parallel error* of a segment is the relative error of its fused update on the same data:
``|seq(x) - par(x)| / |seq(x) - x|``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from puzzle.fusion.fuse import parallel_reference, sequential_reference
from puzzle.fusion.runs import Segment
from puzzle.model import PuzzleForCausalLM


@dataclass
class RunDependency:
    """The pairwise dependency matrix of one run (``matrix[i][j]`` for i < j, 0 elsewhere)."""

    run: Segment
    matrix: list[list[float]]
    tokens: int
    widths: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"run": self.run.label, "start": self.run.start, "stop": self.run.stop, "tokens": self.tokens,
                "widths": self.widths, "matrix": self.matrix}


@torch.no_grad()
def run_inputs(model: PuzzleForCausalLM, ids: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The residual stream entering each of ``layers`` on ``ids`` (N, T): {layer: (N, T, H)}."""
    out = model.model(input_ids=ids.to(model.device), use_cache=False, output_hidden_states=True)
    hidden = out[2]  # L + 1 tensors (N, T, H); hidden[l] enters layer l
    return {layer: hidden[layer] for layer in layers}


def _cos_distance_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum over tokens of 1 - cos(a, b), both (B, T, H), in float32; 0 where both are zero (an FFN
    whose output is zero with and without the other block did not change)."""
    a, b = a.float(), b.float()
    dist = 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)  # (B, T)
    both_zero = (a.abs().amax(-1) == 0) & (b.abs().amax(-1) == 0)
    return float(dist.masked_fill(both_zero, 0.0).double().sum())


@torch.no_grad()
def run_dependency(model: PuzzleForCausalLM, run: Segment, x0: torch.Tensor, *, chunk: int = 4) -> RunDependency:
    """The dependency matrix of ``run`` from its inputs ``x0`` (N, T, H), ``chunk`` sequences at a time."""
    layers = [model.model.layers[i] for i in run.layers]
    n = len(layers)
    sums = [[0.0] * n for _ in range(n)]
    tokens = 0
    for c in range(0, x0.shape[0], chunk):
        x = x0[c:c + chunk]  # (b, T, H)
        xs, fs = [], []
        for block in layers:  # the sequential run: x_k and f_k
            f = block.mlp(block.post_attention_layernorm(x))
            xs.append(x)
            fs.append(f)
            x = x + f
        for j in range(1, n):
            block = layers[j]
            for i in range(j):
                without_i = block.mlp(block.post_attention_layernorm(xs[j] - fs[i]))
                sums[i][j] += _cos_distance_sum(fs[j], without_i)
        tokens += x.shape[0] * x.shape[1]
    matrix = [[s / tokens for s in row] for row in sums]
    widths = [model.config.blocks[i].ffn.intermediate_size for i in run.layers]
    return RunDependency(run=run, matrix=matrix, tokens=tokens, widths=widths)


@torch.no_grad()
def parallel_error(model: PuzzleForCausalLM, segment: Segment, x0: torch.Tensor, *, chunk: int = 4) -> float:
    """``|seq(x) - par(x)| / |seq(x) - x|`` over the tokens of ``x0`` (N, T, H) (Frobenius norms)."""
    err = upd = 0.0
    for c in range(0, x0.shape[0], chunk):
        x = x0[c:c + chunk]
        seq = sequential_reference(model, segment, x)
        par = parallel_reference(model, segment, x)
        err += float((seq - par).double().pow(2).sum())
        upd += float((seq - x).double().pow(2).sum())
    return (err / upd) ** 0.5 if upd > 0 else 0.0
