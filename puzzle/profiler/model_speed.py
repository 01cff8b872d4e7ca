"""Measured milliseconds of one whole-model serving step (prefill or decode) on this device.

The step is what serving runs: prefill of ``batch x length`` prompt tokens, or one decode token
per sequence against ``length`` cached positions, each ending in next-token logits of the last
position only. Decode runs against a preallocated :class:`ModelKVCache` whose writes land on
fixed positions, so repeats neither grow the cache nor reallocate: the timing is the model's,
not the cache bookkeeping's (the "lean path" the profiler's CPU roofline describes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from puzzle.model import PuzzleForCausalLM
from puzzle.profiler.measure import STATISTICS, StaticKVCache, time_ms
from puzzle.profiler.scenario import Scenario


class ModelKVCache:
    """One :class:`StaticKVCache` per attention layer, with the two methods the runtime calls."""

    def __init__(self, model: PuzzleForCausalLM, *, batch: int, past: int, new_tokens: int = 1) -> None:
        param = next(model.parameters())
        cfg = model.config
        self.past = past
        self.slots = [
            StaticKVCache(batch, b.attention.num_key_value_heads, past, cfg.head_dim, new_tokens=new_tokens,
                          device=param.device, dtype=param.dtype)
            for b in cfg.blocks if b.attention.kind == "gqa"
        ]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past

    def update(self, k: torch.Tensor, v: torch.Tensor, slot: int, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slots[slot].update(k, v, slot)  # (B, nkv, past + T, hd) each


@torch.inference_mode()
def measure_model_ms(model: PuzzleForCausalLM, sc: Scenario, *, repeats: int = 10, warmup: int = 2,
                     statistic: str = "min", seed: int = 0) -> float:
    """Milliseconds of one step of ``sc`` with ``model`` on its own device and dtype.

    ``statistic``: ``min`` (default; on a shared CPU interference only slows a run down) or ``median``.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; choose one of {sorted(STATISTICS)}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (sc.batch, sc.new_tokens), generator=gen).to(device)
    if sc.phase == "decode":
        cache = ModelKVCache(model, batch=sc.batch, past=sc.length)

        def step() -> Any:
            return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    else:
        def step() -> Any:
            return model(input_ids=ids, use_cache=False, logits_to_keep=1)

    return time_ms(step, device, repeats=repeats, warmup=warmup, statistic=statistic)


def measure_models_ms(models: Sequence[PuzzleForCausalLM], sc: Scenario, *, rounds: int = 3, repeats: int = 5,
                      warmup: int = 2) -> list[float]:
    """Milliseconds of one step of ``sc`` for each model, timed in interleaved rounds (A B A B ...).

    On a shared machine the speed drifts over seconds; interleaving exposes every model to the same
    drift and the fastest time over all rounds is kept per model, so a ratio of two results is fair.
    """
    best = [float("inf")] * len(models)
    for r in range(rounds):
        for k, model in enumerate(models):
            ms = measure_model_ms(model, sc, repeats=repeats, warmup=warmup if r == 0 else 1)
            best[k] = min(best[k], ms)
    return best
