"""Context-aware scores: every block's replace-1 KL measured inside a chosen child instead of the parent.

Replace-1 scoring (:mod:`puzzle.scoring.replace1`) measures each block with every other layer the
parent's, so the MIP's objective (the sum of those scores) is a first-order estimate around the
*parent*. Near the optimum the children it compares differ in a few layers and share the rest, which
is already far from the parent: the sum predicts their KLs within 0.2-0.4% of each other while they
measure 9-38% apart. Measured around a child ``C`` instead:

    delta(l, b | C) = KL(parent || C with layer l := b) - KL(parent || C)       (0 for C's own block)
    predicted(S | C) = KL(parent || C) + sum over layers l where S_l != C_l of delta(l, S_l | C)

a first-order estimate around ``C``, which sees how each block interacts with ``C``'s other layers. As
in replace-1 scoring, a block whose two halves both differ from ``C``'s scores the sum of its halves'
deltas (``a|f_C`` and ``a_C|f``), so one layer costs ``|A| + |F| - 2`` measurements; ``only`` restricts them to
the halves of a few blocks per layer (the finalists', say), which is what a search can afford: measured on
1,024 tokens, every half of SmolLM2's quick library (210 swaps) costs about 20 minutes on 2 cores.

``C`` runs once over the ids (its streams cached as :func:`puzzle.scoring.activations.run_parent` does
for the parent); a swap at layer l runs the variant on the cached input and ``C``'s layers l+1..L-1,
and is compared with the *parent's* log-probs. :meth:`ContextScores.problem` turns the deltas into a
score column of the MIP's problem, so re-solving it looks for the best child near ``C``
(:func:`puzzle.search.refine`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from puzzle.errors import ConfigError
from puzzle.scoring.activations import ParentRunner, run_parent
from puzzle.scoring.metrics import TokenSums, next_token_logprobs
from puzzle.scoring.replacements import Replacement, layer_groups, layer_modules, score_group

COLUMN = "context_kl"
"""The score column :meth:`ContextScores.problem` adds: ``delta(l, b | C)``."""
UNSCORED = 1000.0
"""The score of a block without a context score: far above any KL a child can lose or gain."""


@dataclass(frozen=True)
class ContextScores:
    """The deltas of every library block around one child (see the module docstring)."""

    base: tuple[str, ...]
    """``C``: one block label per layer (``gqa:3|swiglu:1024``)."""
    base_kl: float
    """KL(parent || C) per position on the ids."""
    halves: dict[tuple[int, str, str], float]
    """``(layer, "attention" | "ffn", variant label)`` -> delta of C with that half swapped (C's own: absent)."""
    tokens: int
    """Positions each delta was measured on."""
    seconds: float

    def delta(self, layer: int, label: str) -> float:
        """delta(l, b | C) of block ``label`` (``attention|ffn``) at ``layer``: the sum of its halves'."""
        a, f = _split(label)
        a0, f0 = _split(self.base[layer])
        try:
            return (self.halves[(layer, "attention", a)] if a != a0 else 0.0) + \
                   (self.halves[(layer, "ffn", f)] if f != f0 else 0.0)
        except KeyError as e:
            raise ConfigError(f"layer {layer}: block {label} has no context score; was it in the library "
                              "these scores were measured on?") from e

    def predict(self, labels: Sequence[str]) -> float:
        """predicted(S | C) for a child given as one block label per layer."""
        if len(labels) != len(self.base):
            raise ConfigError(f"a child of {len(labels)} layers cannot be predicted around one of {len(self.base)}")
        return self.base_kl + sum(self.delta(l, b) for l, b in enumerate(labels) if b != self.base[l])

    def scored(self, layer: int, label: str) -> bool:
        """Whether block ``label`` at ``layer`` has a context score (its halves are ``C``'s or were measured)."""
        a, f = _split(label)
        a0, f0 = _split(self.base[layer])
        return (a == a0 or (layer, "attention", a) in self.halves) and (f == f0 or (layer, "ffn", f) in self.halves)

    def problem(self, problem: Any) -> Any:
        """``problem`` (a :class:`solvers.Problem`) minimizing the deltas (column :data:`COLUMN`) instead.

        Its objective is ``predicted(S | C) - base_kl``. A block without a context score (``only`` left it out)
        scores :data:`UNSCORED`: ``C`` itself is feasible at 0, so the optimum never holds one. The candidates
        stay the same, in the same order (the parent's included, which the speed totals need). Only
        one-layer candidates (no fused runs)."""
        fused = [c.id for c in problem.candidates if len(c.layers) != 1]
        if fused:
            raise ConfigError(f"context scores cover one-layer blocks; the problem has fused candidates {fused[:3]}")
        cands = [replace(c, scores={**c.scores, COLUMN: self.delta(c.layers[0], c.members[0])
                                    if self.scored(c.layers[0], c.members[0]) else UNSCORED})
                 for c in problem.candidates]
        return replace(problem, candidates=tuple(cands), score_column=COLUMN)


def _split(label: str) -> tuple[str, str]:
    a, sep, f = label.partition("|")
    if not sep:
        raise ConfigError(f"a block label is 'attention|ffn', got {label!r}")
    return a, f


@torch.no_grad()
def parent_reference(parent: Any, ids: torch.Tensor, *, chunk: int = 2) -> torch.Tensor:
    """The parent's next-token log-probs on ids (N, T): (N, T-1, V) float32."""
    parent.eval()
    return torch.cat([next_token_logprobs(parent(input_ids=ids[c:c + chunk], use_cache=False).logits).cpu()
                      for c in range(0, ids.shape[0], chunk)])


@torch.no_grad()
def context_scores(library: Any, base: Sequence[str], ids: torch.Tensor, reference: torch.Tensor, *,
                   only: Mapping[int, Collection[str]] | None = None, variant_batch: int = 4, head_chunk: int = 2,
                   progress: bool = False) -> ContextScores:
    """Every variant half of ``library`` swapped, one layer at a time, into the child ``base`` (one block label
    per layer), each measured against the parent's log-probs ``reference`` (:func:`parent_reference`) on ids
    (N, T). ``only[l]``: block labels whose halves alone are swapped at layer ``l`` (None: every half of the
    library). Memory: the child, its streams (2 L x N x T x H floats), the reference and ``variant_batch`` x N
    sequences in flight."""
    from puzzle.schema import blocks_from_list
    from solvers.labels import block_dict

    t0 = time.perf_counter()
    L = library.parent_config.num_hidden_layers
    if len(base) != L:
        raise ConfigError(f"the child has {len(base)} layers but the library's parent has {L}")
    N, T = ids.shape
    if tuple(reference.shape[:2]) != (N, T - 1):
        raise ConfigError(f"the reference log-probs are {tuple(reference.shape)}, the ids ({N}, {T}): "
                          "compute them with parent_reference on the same ids")
    child = library.assemble(blocks_from_list([block_dict(b) for b in base]))
    runner = ParentRunner(child, head_chunk=head_chunk)
    cache = run_parent(runner, ids)  # the child's own streams and log-probs
    sums = TokenSums()
    sums.add(reference, cache.logprobs, cache.labels)
    base_kl = sums.means()["kl"]
    cache.logprobs = reference  # from here on every swap is compared with the parent
    swaps = {l: _swaps(library, l, base[l], None if only is None else only.get(l, ())) for l in range(L)}
    bar = tqdm(total=sum(map(len, swaps.values())), desc="context scores", unit="block", disable=not progress)
    halves: dict[tuple[int, str, str], float] = {}
    for l in range(L):
        if not swaps[l]:
            continue
        a0, f0 = _split(base[l])
        modules = layer_modules(library, l, initial=False, keep=(("attention", a0), ("ffn", f0)))
        ctx, attn_out = runner.context(T), {}
        for group in layer_groups([Replacement(l, *_split(base[l]))] + swaps[l], variant_batch)[1:]:
            for rep, row in zip(group, score_group(runner, cache, group, modules, ctx, attn_out, a0)):
                sub, label = ("attention", rep.attention) if rep.attention != a0 else ("ffn", rep.ffn)
                halves[(l, sub, label)] = row["kl"] - base_kl
            bar.update(len(group))
    bar.close()
    return ContextScores(base=tuple(base), base_kl=base_kl, halves=halves, tokens=N * (T - 1),
                         seconds=time.perf_counter() - t0)


def _swaps(library: Any, layer: int, label: str, only: Collection[str] | None) -> list[Replacement]:
    """The one-half swaps of ``layer``'s block ``label``: other attentions with its FFN, then other FFNs (of the
    blocks ``only``, when given)."""
    a0, f0 = _split(label)
    atts, ffns = library.labels(layer, "attention"), library.labels(layer, "ffn")
    if only is not None:
        halves = [_split(b) for b in only]
        atts = [a for a in atts if a in {h[0] for h in halves}]
        ffns = [f for f in ffns if f in {h[1] for h in halves}]
    return [Replacement(layer, a, f0) for a in atts if a != a0] + [Replacement(layer, a0, f) for f in ffns if f != f0]
