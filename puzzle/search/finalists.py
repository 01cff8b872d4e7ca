"""Finalists: the MIP's best few different children, each assembled and measured; the best measured goes on.

The MIP ranks children by the sum of their blocks' replace-1 scores, an additive estimate of the
child's KL. Near the optimum several children differ by less than that estimate's error, so
the search asks the MIP for ``k`` solutions that differ in at least a tenth of their layers
(:func:`solvers.diverse.diverse_solutions`), assembles each from the library and measures its KL
to the parent on held-out tokens (one forward each), and keeps the lowest:

    finalists = measure_finalists(library, parent, solutions, ids)   # best (lowest KL) first
    finalists[0].solution                                           # goes on to fusion and GKD

The held-out tokens are validation sequences after the ones the final evaluation reads
(:func:`finalist_ids`), so the choice never sees the tokens its child is reported on. Spearman's
rank correlation between the predicted and the measured KL (:func:`score_fidelity`) says how far
the additive score can be trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from puzzle.scoring.metrics import TokenSums, next_token_logprobs

SEQ_LEN = 256
"""Tokens per held-out sequence where no quality context is given (a search's: :func:`finalist_reads`)."""
SEQUENCES = 4
"""Held-out sequences of :data:`SEQ_LEN` tokens each finalist is measured on (1,024 tokens)."""
MIN_SKIP_TOKENS = 16 * SEQ_LEN
"""A search's finalists skip at least 4,096 validation tokens: changing the evaluation's size within them does not
change the finalists' tokens, so it reruns only the evaluation."""


def finalist_reads(eval_tokens: int, seq_len: int) -> tuple[int, int]:
    """``(skip, sequences)`` of a search's finalists at its quality context ``seq_len``: they skip the final
    evaluation's ``eval_tokens`` (its longest context's, at least :data:`MIN_SKIP_TOKENS`) and read at least
    :data:`SEQUENCES` x :data:`SEQ_LEN` tokens, in at least 2 sequences."""
    skip = -(-max(eval_tokens, MIN_SKIP_TOKENS) // seq_len)
    return skip, max(2, SEQUENCES * SEQ_LEN // seq_len)


@dataclass(frozen=True)
class Finalist:
    """One MIP solution, ranked by the MIP (``mip_rank`` 0: its optimum) and measured."""

    mip_rank: int
    solution: Any  # solvers.Solution
    quality: dict[str, float]
    """:func:`measure`'s metrics: ``kl`` (mean KL(parent || child) per held-out position), ``top1_agreement``,
    ``ppl``..."""

    @property
    def kl(self) -> float:
        return self.quality["kl"]

    def row(self) -> dict[str, Any]:
        t = self.solution.totals
        return {"mip_rank": self.mip_rank, "predicted_kl": self.solution.objective, "kl": self.kl,
                "top1_agreement": self.quality["top1_agreement"], "params": t.params, "speedup": t.speedup,
                "blocks": " ".join(self.solution.layer_labels())}


def finalist_ids(sources: Sequence[str], tokenizer: Any, *, skip: int, sequences: int,
                 seq_len: int = SEQ_LEN) -> torch.Tensor:
    """``sequences`` validation sequences of ``seq_len`` tokens after the first ``skip`` (the final
    evaluation's): ``(N, seq_len)``."""
    from puzzle.data import load_sequences

    ids = load_sequences(list(sources), tokenizer, seq_len=seq_len, num_sequences=skip + sequences,
                         split="validation")
    held_out = ids[skip:]
    if held_out.shape[0] == 0:
        from puzzle.errors import DataError

        raise DataError(f"the validation split of {list(sources)} has no sequences after the first {skip}; add data")
    return held_out


@torch.no_grad()
def parent_logprobs(parent: Any, ids: torch.Tensor, *, chunk: int = 2) -> list[torch.Tensor]:
    """The parent's next-token log-probs, chunk by chunk: ``[(b, T-1, V)]``, computed once for every finalist."""
    parent.eval()
    return [next_token_logprobs(parent(input_ids=ids[c:c + chunk], use_cache=False).logits).cpu()
            for c in range(0, ids.shape[0], chunk)]


@torch.no_grad()
def measure(child: Any, ids: torch.Tensor, reference: list[torch.Tensor], *, chunk: int = 2) -> dict[str, float]:
    """``child``'s held-out quality on ``ids`` against the parent's log-probs (:func:`parent_logprobs`, same
    ``chunk``): ``kl``, ``top1_agreement``, ``loss_delta``, ``nll``, ``ppl``, ``parent_ppl``..."""
    from puzzle.evaluation.quality import add_chunk, quality_from_sums

    child.eval()
    sums = TokenSums()
    for k, c in enumerate(range(0, ids.shape[0], chunk)):
        x = ids[c:c + chunk]
        logp = next_token_logprobs(child(input_ids=x, use_cache=False).logits).cpu()
        add_chunk(sums, logp, x[:, 1:], reference[k])
    return quality_from_sums(sums, parent=True)


def measure_finalists(library: Any, parent: Any, solutions: Sequence[Any], ids: torch.Tensor, *,
                      reference: list[torch.Tensor] | None = None, progress: bool = False) -> list[Finalist]:
    """Assemble and measure each solution (in MIP order); return them best measured first (ties: MIP order).

    One process holds the parent, one child at a time and the parent's log-probs, ``N x (T-1) x V`` floats
    (SmolLM2, 4 x 256 tokens: 200 MB; a 128k vocabulary: 520 MB)."""
    from puzzle.schema import blocks_from_list

    reference = parent_logprobs(parent, ids) if reference is None else reference  # :func:`parent_logprobs` on ids
    out: list[Finalist] = []
    for rank, sol in enumerate(tqdm(solutions, desc="finalists", unit="child", disable=not progress)):
        child = library.assemble(blocks_from_list(sol.block_configs()))
        quality = measure(child, ids, reference)
        del child
        out.append(Finalist(mip_rank=rank, solution=sol, quality=quality))
    return sorted(out, key=lambda f: (f.kl, f.mip_rank))


def score_fidelity(finalists: Sequence[Finalist]) -> float | None:
    """Spearman's rank correlation between predicted (MIP objective) and measured KL; None under 3 finalists."""
    import pandas as pd

    if len(finalists) < 3:
        return None
    df = pd.DataFrame([f.row() for f in finalists])
    rho = df.predicted_kl.rank().corr(df.kl.rank())
    return None if pd.isna(rho) else float(rho)
