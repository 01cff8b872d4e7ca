"""Memory of child-aware BLD on one rank, and the layer rounds and step windows that keep it under a budget.

    W = window_steps(steps, every, step_bytes)                      # steps a window holds (its streams <= 1 GiB)
    plan = plan_rank(shape, layers, budget=72e9, window=W, ...)     # this rank's rounds and each one's peak
    plan.rounds                                                     # (range(0, 3), range(3, 6), range(6, 10))

A rank of layer-sharded child-aware BLD (:mod:`puzzle.distill.child_bld_sharded`) trains the replaced sub-blocks of
its layers. Holding all of them at once costs, per layer, the parent's and the child's weights (fp32) and
the gradient and AdamW moments of every trained parameter (12 bytes beyond its weight): 200 GiB for
the ten layers of a 70B parent's rank on 8 GPUs. So a rank splits its layers into contiguous *rounds* that each fit
its budget, and trains them in turn over a *window* of ``W`` steps::

    window [s, s + W):  round 0: load its layers (and its last checkpoint), run the W steps on the streams that
                                 enter the rank, keep the W streams it hands on (B, T, H each), checkpoint, free
                        round 1: the same on round 0's streams ...
                        last:    ... send its streams to the next rank

Layer ``l`` at step ``s`` sees the stream of layers ``< l`` at step ``s`` either way, so the weights are those of one
round. A window's streams (``W x B x T x H`` float32, in host memory) are bounded by :data:`WINDOW_BYTES`; every
window reloads each round's parent layers and checkpoint, which the plan counts. One round (everything fits) keeps
the layers loaded for the whole run, with no window streams: the code path of a rank without rounds.

The child-stream refit runs before the training; it holds every layer of the rank when one round does and the
refit's streams and Gram fit beside them, otherwise one layer at a time (:func:`refit_peak`). A GPU rank whose
refit still does not fit keeps its float64 Gram and elimination in host RAM (``host`` of
:func:`~puzzle.distill.child_refit.refit_layers`: a 405B FFN's are over 100 GiB). A GPU rank 0 whose first
layer and embedding do not fit together embeds the ids in host RAM (a lookup: the same streams).

Rank 0 holds one embedding for both models when the child's is the parent's (a library child: the library's
``shared.safetensors`` holds the parent's embedding), two otherwise when the refit needs the parent's stream.

Closed form from the configs: the plan (``puzzle/search/stages/child_bld.py``) and the run use the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from block_library.memory import CUDA_CONTEXT_BYTES, PROCESS_BYTES, TRAIN_BYTES_PER_PARAM

WINDOW_BYTES = 2**30
"""Largest size of the streams a window keeps between two rounds (float32), unless a caller gives another bound."""
FP32 = 4


@dataclass(frozen=True)
class LayerShape:
    """What a rank's memory depends on, every list indexed by layer (all layers of the model)."""

    parent: Sequence[int]
    """Parameters of each parent layer."""
    child: Sequence[int]
    """Parameters of each child layer."""
    trained: Sequence[int]
    """Parameters of each layer's trained (replaced) sub-blocks."""
    width: Sequence[int]
    """The parent's FFN width of each layer (the widest activation, and the refit's Gram)."""
    hidden: int
    heads: int
    embedding: int
    """Parameters of the embedding (rank 0 embeds the ids)."""

    def weights(self, layers: Sequence[int]) -> float:
        return FP32 * sum(self.parent[l] + self.child[l] for l in layers)

    def train(self, layers: Sequence[int]) -> float:
        """The layers' weights, and the gradient and AdamW moments of their trained sub-blocks (the master weight of
        :data:`TRAIN_BYTES_PER_PARAM` is the child's own fp32 weight, counted once)."""
        return FP32 * sum(self.parent[l] + self.child[l] for l in layers) + (TRAIN_BYTES_PER_PARAM - FP32) * sum(
            self.trained[l] for l in layers)


def layer_shape(parent: Any, child: Any, parts: Sequence[tuple[int, str]]) -> LayerShape:
    """The :class:`LayerShape` of a ``parent`` and a ``child`` (runtime configs) whose sub-blocks ``parts``
    (``(layer, "attention" | "ffn")``) are trained."""
    from puzzle.summary import attention_params, ffn_params

    params = {"attention": attention_params, "ffn": ffn_params}
    trained = [0] * len(child.blocks)
    for l, sub in parts:
        trained[l] += params[sub](getattr(child.blocks[l], sub), child)
    sizes = lambda c: [attention_params(b.attention, c) + ffn_params(b.ffn, c) for b in c.blocks]  # noqa: E731
    width = [b.ffn.intermediate_size if b.ffn.kind == "swiglu" else parent.hidden_size for b in parent.blocks]
    embedding = parent.vocab_size * parent.hidden_size
    return LayerShape(parent=sizes(parent), child=sizes(child), trained=trained, width=width,
                      hidden=parent.hidden_size, heads=parent.num_attention_heads, embedding=embedding)


@dataclass(frozen=True)
class RefitShape:
    """The child-stream refit's share of a rank: the tokens it fits on, which layers, with the parent's stream."""

    tokens: int
    last: int
    """The last layer whose FFN is refit (the layers up to it are walked)."""
    drift: bool
    select: bool
    chunk_tokens: int
    shared_embedding: bool = False
    """The child's embedding is the parent's (a library child): rank 0 holds one for both streams."""
    layers: tuple[int, ...] | None = None
    """The layers whose FFN is refit (None: every walked layer, an upper bound); only these hold a Gram."""
    seq_len: int = 256
    """Tokens per sequence of the chunks (the training's)."""

    @property
    def embeddings(self) -> int:
        """Embeddings rank 0 holds for the refit: the child's, and with drift the parent's unless it is the same."""
        return 2 if self.drift and not self.shared_embedding else 1


@dataclass(frozen=True)
class RankPlan:
    """One rank's rounds and what each costs on its device."""

    rounds: tuple[range, ...]
    round_bytes: tuple[float, ...]
    """Each round's device peak while it trains (the process, its weights, AdamW state, one step's work)."""
    refit_bytes: float
    """The refit's device peak (0 without one)."""
    refit_whole: bool
    """The refit holds the rank's layers together (the one-round path); otherwise one layer at a time."""
    window_bytes: float
    """The window's streams (host memory; 0 with one round)."""
    refit_host: bool = False
    """The refit's float64 Gram and elimination in host RAM (its device share does not fit otherwise)."""
    refit_host_bytes: float = 0.0
    """Their host bytes (0 without ``refit_host``)."""
    embed_host: bool = False
    """Rank 0's training embeds the ids in host RAM (its first layer and the embedding do not fit together)."""

    @property
    def peak(self) -> float:
        return max((*self.round_bytes, self.refit_bytes), default=0.0)


def base_bytes(cpu: bool) -> float:
    """A rank holding nothing: the process (and the CUDA context on a GPU)."""
    return PROCESS_BYTES if cpu else CUDA_CONTEXT_BYTES


def step_work_bytes(shape: LayerShape, layers: Sequence[int], batch: int, seq_len: int) -> float:
    """One training step's work beside the weights: one layer's activations and their backward (the stream, norms,
    q/k/v/o, the FFN's projections) and the stream in and out (float32). Causal SDPA runs flash kernels, on the CPU
    too (torch 2.13: 8 MiB for 8 heads of 2048 tokens, whose scores would be 128 MiB): no (B, nh, T, T) scores."""
    H, BT = shape.hidden, batch * seq_len
    width = max((shape.width[l] for l in layers), default=0)
    return BT * (16 * H + 4 * width) * FP32 + 2 * BT * H * FP32  # causal SDPA: flash forward and backward, no (T, T)


def window_steps(steps: int, every: int, step_bytes: float, bound: float = WINDOW_BYTES) -> int:
    """Steps of a window: as many as keep its streams (``step_bytes`` each) under ``bound``, at least one, a multiple
    of ``every`` (the checkpoint period) when that many fit, at most the run (rounded up to ``every``)."""
    fit = max(1, int(bound // max(step_bytes, 1)))
    return min(fit // every * every if fit >= every else fit, -(-steps // every) * every)


def resume_period(window: int, world: int) -> int:
    """Steps between the checkpoints a rerun can resume from when ranks train in rounds: a rank's last round can
    only send window ``w`` once the next rank's first round is taking it, so the ranks stay within ``world``
    windows of one another and two checkpoints ``world`` windows apart always share a step
    (:mod:`puzzle.distill.child_bld_files`)."""
    return window * world


def split_rounds(costs: Sequence[float], budget: float, max_layers: int | None = None) -> list[range]:
    """Contiguous groups of ``costs`` (indices ``0..n``): as few as fit ``budget`` each (a layer over it alone) and
    at most ``max_layers`` long, balanced so that the largest is as small as that count allows."""
    n = len(costs)
    if n == 0:
        return []
    cap = max_layers or n
    count, acc, size = 1, 0.0, 0
    for c in costs:  # greedy: the fewest groups
        if size and (acc + c > budget or size == cap):
            count, acc, size = count + 1, 0.0, 0
        acc, size = acc + c, size + 1
    # the smallest largest group among `count` contiguous groups of at most `cap` (n is a few dozen layers)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(count + 1)]
    cut = [[0] * (n + 1) for _ in range(count + 1)]
    best[0][0] = 0.0
    for k in range(1, count + 1):
        for i in range(1, n + 1):
            for j in range(max(k - 1, i - cap), i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    out, i = [], n
    for k in range(count, 0, -1):
        out.append(range(cut[k][i], i))
        i = cut[k][i]
    return out[::-1]


def refit_peak(shape: LayerShape, layers: range, refit: RefitShape, *, whole: bool, first: bool, cpu: bool,
               host: bool = False) -> float:
    """The refit's device peak on a rank running ``layers``: with ``whole``, the rank's layers of both models (rank
    0: the embeddings too) beside the refit's streams, one chunk and one layer's Gram (:func:`refit_bytes`; with
    ``host`` only a chunk's float32 sums of it); otherwise one layer of each at a time, and on rank 0 the
    embeddings with the streams they start."""
    from puzzle.distill.child_refit import refit_bytes

    walked = [l for l in layers if l <= refit.last]
    if not walked:
        return 0.0
    fitted = [l for l in walked if refit.layers is None or l in refit.layers]  # the layers that hold a Gram
    width = max((shape.width[l] for l in fitted), default=0)
    gram = refit_bytes(refit.tokens, shape.hidden, width, FP32, refit.chunk_tokens, drift=refit.drift,
                       select=refit.select, host=host)
    embeds = FP32 * shape.embedding * refit.embeddings if first else 0
    if whole:
        return base_bytes(cpu) + shape.weights(layers) + embeds + gram
    streams = refit.tokens * shape.hidden * FP32 * (2 if refit.drift else 1)
    return base_bytes(cpu) + max(max(shape.weights([l]) for l in walked) + gram, embeds + streams)


def refit_host_peak(shape: LayerShape, layers: range, refit: RefitShape) -> float:
    """Host bytes of the refit's Gram and elimination on a rank running ``layers`` with ``host``
    (:func:`~puzzle.distill.child_refit.refit_host_bytes` at its widest refit layer)."""
    from puzzle.distill.child_refit import refit_host_bytes

    fitted = [l for l in layers if l <= refit.last and (refit.layers is None or l in refit.layers)]
    return float(refit_host_bytes(shape.hidden, max(shape.width[l] for l in fitted), refit.select)) if fitted else 0.0


def plan_rank(shape: LayerShape, layers: range, *, batch: int, seq_len: int, window: int, first: bool, cpu: bool,
              budget: float | None = None, refit: RefitShape | None = None, max_layers: int | None = None
              ) -> RankPlan:
    """The rounds of a rank that runs ``layers`` (``first``: rank 0, which embeds), each within ``budget`` device
    bytes (None: one round), ``window`` steps at a time; with ``refit``, whether the refit holds them whole, and on
    a GPU whether its Gram goes to host RAM and rank 0's embedding too (each only when the device cannot hold it)."""
    work = step_work_bytes(shape, layers, batch, seq_len)
    embed = FP32 * shape.embedding if first else 0.0
    stream = window * batch * seq_len * shape.hidden * FP32  # the window's streams between two rounds
    base = base_bytes(cpu)
    budget = float("inf") if budget is None else budget

    def peaks(rounds: list[range], windowed: bool, embedded: float) -> tuple[float, ...]:
        held = stream if windowed and cpu else 0.0  # host memory: the device's on the CPU
        return tuple(base + shape.train(r) + work + held + (embedded if i == 0 else 0.0) for i, r in enumerate(rounds))

    def refit_plan(whole: bool) -> dict[str, Any]:
        """The refit's device peak, on the device or (a GPU that cannot hold it) with its Gram in host RAM."""
        if refit is None:
            return {"refit_bytes": 0.0, "refit_whole": whole}
        peak = refit_peak(shape, layers, refit, whole=whole, first=first, cpu=cpu)
        if peak <= budget or cpu or whole:
            return {"refit_bytes": peak, "refit_whole": whole}
        return {"refit_bytes": refit_peak(shape, layers, refit, whole=False, first=first, cpu=cpu, host=True),
                "refit_whole": False, "refit_host": True, "refit_host_bytes": refit_host_peak(shape, layers, refit)}

    # the refit's parent embedding stays with the models it loaded (one round), unless it is the child's
    drift_embed = FP32 * shape.embedding * (refit.embeddings - 1) if first and refit is not None else 0.0
    whole = [layers] if len(layers) else []
    one = tuple(b + drift_embed for b in peaks(whole, False, embed))
    fits = max(one, default=0.0) <= budget and (max_layers is None or len(layers) <= max_layers)
    if fits:  # the training holds every layer; the refit too, or walks them one at a time first
        whole_refit = refit_plan(True)
        on = whole_refit if whole_refit["refit_bytes"] <= budget else refit_plan(False)
        return RankPlan(**{"refit_whole": False, **on}, rounds=tuple(whole), round_bytes=one, window_bytes=0.0)
    fixed = base + work + (stream if cpu else 0.0)

    def split(embedded: float) -> list[range]:
        costs = [shape.train([l]) + (embedded if i == 0 else 0.0) for i, l in enumerate(layers)]
        return [range(layers.start + r.start, layers.start + r.stop) for r in split_rounds(costs, budget - fixed,
                                                                                            max_layers)]

    rounds = split(embed)
    windowed = len(rounds) > 1
    round_bytes = peaks(rounds, windowed, embed)
    embed_host = bool(first and not cpu and max(round_bytes) > budget)
    if embed_host:  # the first layer and the embedding do not fit together: the lookup in host RAM
        rounds = split(0.0)
        windowed = len(rounds) > 1
        round_bytes = peaks(rounds, windowed, 0.0)
    return RankPlan(**{"refit_whole": False, **refit_plan(False)}, rounds=tuple(rounds), round_bytes=round_bytes,
                    window_bytes=stream if windowed else 0.0, embed_host=embed_host)
