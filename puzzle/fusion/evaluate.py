"""What fusing costs and buys: KL of the fused model to the unfused one, and step latency.

Quality is measured on held-out ids against the unfused model (the model the fusion starts
from), so it isolates the parallel approximation. Latency is predicted by the profiler's
roofline for any target (``8xH100`` bf16: fewer sequential steps and all-reduces under tensor
parallelism) and measured on this machine with :func:`puzzle.profiler.model_speed.measure_model_ms`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from puzzle.model import PuzzleForCausalLM
from puzzle.profiler.counts import ModelShape
from puzzle.profiler.hardware import Target
from puzzle.profiler.model_speed import measure_models_ms
from puzzle.profiler.roofline import model_ms
from puzzle.profiler.scenario import Scenario
from puzzle.schema import BlockConfig
from puzzle.scoring.metrics import TokenSums, next_token_logprobs


@torch.no_grad()
def reference_logprobs(model: PuzzleForCausalLM, ids: torch.Tensor, *, chunk: int = 2) -> list[torch.Tensor]:
    """Next-token log-probs of ``model`` on ``ids`` (N, T), as chunks (b, T-1, V) float32."""
    device = next(model.parameters()).device
    return [next_token_logprobs(model(input_ids=ids[c:c + chunk].to(device), use_cache=False).logits).cpu()
            for c in range(0, ids.shape[0], chunk)]


@torch.no_grad()
def kl_to_reference(model: PuzzleForCausalLM, ids: torch.Tensor, reference: Sequence[torch.Tensor], *,
                    chunk: int = 2) -> dict[str, float]:
    """``kl``, ``loss_delta`` and ``top1_agreement`` of ``model`` against precomputed reference log-probs."""
    device = next(model.parameters()).device
    sums = TokenSums()
    for k, c in enumerate(range(0, ids.shape[0], chunk)):
        x = ids[c:c + chunk]
        logp = next_token_logprobs(model(input_ids=x.to(device), use_cache=False).logits).cpu()
        sums.add(reference[k], logp, x[:, 1:])
    return sums.means()


def predicted_ms(config_or_shape: object, blocks: Sequence[BlockConfig], scenarios: Sequence[Scenario],
                 target: Target) -> dict[str, float]:
    """Predicted step milliseconds of an architecture per scenario: {scenario name: ms}."""
    shape = config_or_shape if isinstance(config_or_shape, ModelShape) else ModelShape.from_config(config_or_shape)
    return {sc.name: model_ms(shape, blocks, sc, target) for sc in scenarios}


def measured_ms(models: Sequence[PuzzleForCausalLM], scenarios: Sequence[Scenario], *, repeats: int = 10
                ) -> list[dict[str, float]]:
    """Measured step milliseconds per model and scenario on this device: interleaved rounds, fastest kept."""
    out: list[dict[str, float]] = [{} for _ in models]
    for sc in scenarios:
        for k, ms in enumerate(measure_models_ms(models, sc, rounds=5, repeats=max(1, repeats // 5))):
            out[k][sc.name] = ms
    return out
