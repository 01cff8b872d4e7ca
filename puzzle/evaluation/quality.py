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
from typing import Any

import torch
from tqdm.auto import tqdm

from puzzle.errors import ConfigError, DataError
from puzzle.model import PuzzleForCausalLM
from puzzle.scoring.metrics import TokenSums, next_token_logprobs


def _logprobs(model: PuzzleForCausalLM, x: torch.Tensor) -> torch.Tensor:
    """(b, T) ids -> (b, T-1, V) float32 next-token log-probs on the CPU."""
    device = next(model.parameters()).device
    return next_token_logprobs(model(input_ids=x.to(device), use_cache=False).logits).cpu()


def check_vocabularies(model_config: Any, parent_config: Any) -> None:
    """Raise :class:`ConfigError` when the two models cannot be compared token by token."""
    if parent_config.vocab_size != model_config.vocab_size:
        raise ConfigError(f"model and parent vocabularies differ ({model_config.vocab_size} vs "
                          f"{parent_config.vocab_size}): they cannot be compared token by token")


def add_chunk(sums: TokenSums, logp: torch.Tensor, labels: torch.Tensor, parent_logp: torch.Tensor | None) -> None:
    """Accumulate one chunk: the model's log-probs (b, T-1, V), the next tokens (b, T-1), and the parent's
    log-probs (b, T-1, V) or None (then only ``child_nll`` and ``tokens`` are kept)."""
    if parent_logp is None:
        sums.child_nll -= float(logp.gather(-1, labels.unsqueeze(-1)).double().sum())
        sums.tokens += labels.numel()
    else:
        sums.add(parent_logp, logp, labels)


def quality_from_sums(sums: TokenSums, *, parent: bool) -> dict[str, float]:
    """The reported metrics from the running sums (the parent's columns when ``parent``)."""
    nll = sums.child_nll / sums.tokens
    out: dict[str, float] = {"nll": nll, "ppl": math.exp(nll), "tokens": sums.tokens}
    if parent:
        parent_nll = sums.parent_nll / sums.tokens
        out.update(sums.means())
        out.update(parent_nll=parent_nll, parent_ppl=math.exp(parent_nll))
    return out


@torch.no_grad()
def evaluate_quality(model: PuzzleForCausalLM, ids: torch.Tensor, *, parent: PuzzleForCausalLM | None = None,
                     chunk: int = 2, progress: bool = False) -> dict[str, float]:
    """``nll``, ``ppl`` and ``tokens`` of ``model`` on ``ids`` (N, T); with ``parent`` also ``kl``,
    ``top1_agreement``, ``loss_delta``, ``parent_nll`` and ``parent_ppl``.

    ``parent`` may be ``model`` itself: its log-probs are then computed once (KL exactly 0).
    Layer-sharded over processes, from model directories: :func:`puzzle.evaluation.sharded.evaluate_sharded`.
    """
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise DataError(f"ids must be (N, T) with T >= 2, got shape {tuple(ids.shape)}")
    if parent is not None:
        check_vocabularies(model.config, parent.config)
    sums = TokenSums()  # without a parent, only child_nll and tokens are used
    starts = range(0, ids.shape[0], chunk)
    for c in tqdm(starts, desc="held-out quality", unit="chunk", disable=not progress):
        x = ids[c:c + chunk]
        logp = _logprobs(model, x)  # (b, T-1, V)
        parent_logp = None if parent is None else logp if parent is model else _logprobs(parent, x)
        add_chunk(sums, logp, x[:, 1:], parent_logp)
    return quality_from_sums(sums, parent=parent is not None)
