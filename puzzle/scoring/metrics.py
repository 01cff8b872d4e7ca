"""Per-token quality of a child against its parent, from log-probabilities at next-token positions.

For every position t that predicts token t+1, with p the parent's and q the child's
log-probabilities over the vocabulary (V,):

    kl_t    = sum_v exp(p_v) * (p_v - q_v)        KL(parent || child), in nats
    dce_t   = -q[label_t] - (-p[label_t])          child cross-entropy minus parent cross-entropy
    agree_t = [argmax q == argmax p]               top-1 agreement with the parent

:class:`TokenSums` accumulates their sums in float64 over chunks (each chunk is float32 inside),
so a long evaluation stays accurate and bounded in memory. Identical logits give a KL of exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits -> (B, T-1, V) float32 log-probs at the positions that have a next token."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


@dataclass
class TokenSums:
    """Running sums of the per-token metrics; :meth:`means` turns them into the reported scores."""

    kl: float = 0.0
    child_nll: float = 0.0
    parent_nll: float = 0.0
    agree: float = 0.0
    tokens: int = 0

    def add(self, parent_logp: torch.Tensor, child_logp: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate one chunk: log-probs (B, T', V) float32, labels (B, T') int64 (the next tokens)."""
        kl = (parent_logp.exp() * (parent_logp - child_logp)).sum(-1).clamp_min(0.0)  # (B, T'), >= 0
        idx = labels.unsqueeze(-1)  # (B, T', 1)
        self.kl += float(kl.double().sum())
        self.child_nll -= float(child_logp.gather(-1, idx).double().sum())
        self.parent_nll -= float(parent_logp.gather(-1, idx).double().sum())
        self.agree += float((child_logp.argmax(-1) == parent_logp.argmax(-1)).sum())
        self.tokens += labels.numel()

    def means(self) -> dict[str, float]:
        """``kl``, ``loss_delta`` (child CE - parent CE) and ``top1_agreement``, each a mean per token."""
        n = max(self.tokens, 1)
        return {"kl": self.kl / n, "loss_delta": (self.child_nll - self.parent_nll) / n,
                "top1_agreement": self.agree / n}


def compare_logits(parent_logits: torch.Tensor, child_logits: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """The three metrics of a child against its parent from full logits (B, T, V) and the ids (B, T)."""
    sums = TokenSums()
    sums.add(next_token_logprobs(parent_logits), next_token_logprobs(child_logits), ids[:, 1:])
    return sums.means()
