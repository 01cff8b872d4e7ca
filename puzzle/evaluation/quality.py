"""Held-out quality of a model, alone and against its parent, at every next-token position.

For ids (N, T) there are N * (T-1) positions. With q the model's log-probabilities (V,) at a
position and y the next token:

    nll = mean(-q[y])           cross-entropy in nats;   ppl = exp(nll)

With a parent (log-probs p) the comparison of :mod:`puzzle.scoring.metrics` is added: ``kl``
(KL(parent || model)), ``loss_delta`` (model CE - parent CE), ``top1_agreement`` and the
parent's own ``parent_nll`` / ``parent_ppl``. Sums are float64 over chunks of ``chunk`` rows.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from puzzle.errors import ConfigError, DataError
from puzzle.model import PuzzleForCausalLM
from puzzle.scoring.metrics import TokenSums, next_token_logprobs


def _logprobs(model: PuzzleForCausalLM, x: torch.Tensor) -> torch.Tensor:
    """(b, T) ids -> (b, T-1, V) float32 next-token log-probs on the CPU."""
    device = next(model.parameters()).device
    return next_token_logprobs(model(input_ids=x.to(device), use_cache=False).logits).cpu()


@torch.no_grad()
def evaluate_quality(model: PuzzleForCausalLM, ids: torch.Tensor, *, parent: PuzzleForCausalLM | None = None,
                     chunk: int = 2, progress: bool = False) -> dict[str, float]:
    """``nll``, ``ppl`` and ``tokens`` of ``model`` on ``ids`` (N, T); with ``parent`` also ``kl``,
    ``top1_agreement``, ``loss_delta``, ``parent_nll`` and ``parent_ppl``.

    ``parent`` may be ``model`` itself: its log-probs are then computed once (KL exactly 0).
    """
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise DataError(f"ids must be (N, T) with T >= 2, got shape {tuple(ids.shape)}")
    if parent is not None and parent.config.vocab_size != model.config.vocab_size:
        raise ConfigError(f"model and parent vocabularies differ ({model.config.vocab_size} vs "
                          f"{parent.config.vocab_size}): they cannot be compared token by token")
    sums = TokenSums()  # without a parent, only child_nll and tokens are used
    starts = range(0, ids.shape[0], chunk)
    for c in tqdm(starts, desc="held-out quality", unit="chunk", disable=not progress):
        x = ids[c:c + chunk]
        labels = x[:, 1:]  # (b, T-1)
        logp = _logprobs(model, x)  # (b, T-1, V)
        if parent is None:
            sums.child_nll -= float(logp.gather(-1, labels.unsqueeze(-1)).double().sum())
            sums.tokens += labels.numel()
        else:
            parent_logp = logp if parent is model else _logprobs(parent, x)
            sums.add(parent_logp, logp, labels)
    nll = sums.child_nll / sums.tokens
    out: dict[str, float] = {"nll": nll, "ppl": math.exp(nll), "tokens": sums.tokens}
    if parent is not None:
        parent_nll = sums.parent_nll / sums.tokens
        out.update(sums.means())
        out.update(parent_nll=parent_nll, parent_ppl=math.exp(parent_nll))
    return out
