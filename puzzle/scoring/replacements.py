"""One layer's replacements in replace-1-block scoring (:mod:`puzzle.scoring.replace1`): which blocks are
measured, their modules, and their measurement on the parent's cached activations.

A group of replacements of one layer runs stacked along the batch: each block on the layer's cached input
(N, T, H), the parent's later layers and the head on all of them at once (K * N, T, H), then the metrics of each
against the parent's log-probs. The one-process run and the sharded one (:mod:`puzzle.scoring.sharded`) measure
with these same functions in the same shapes, so they give the same scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from block_library.artifact import Library
from block_library.space import parse_variant
from block_library.variant import Variant, build_module
from puzzle.errors import NumericalError
from puzzle.scoring.activations import ParentCache, ParentRunner
from puzzle.scoring.metrics import TokenSums
from puzzle.scoring.tables import parent_labels


@dataclass(frozen=True)
class Replacement:
    """Layer ``layer`` with block ``attention|ffn`` (sub-block labels)."""

    layer: int
    attention: str
    ffn: str

    @property
    def label(self) -> str:
        return f"{self.attention}|{self.ffn}"


def replacements(lib: Library, layer: int, pairs: str) -> list[Replacement]:
    """The blocks measured at ``layer``: the parent's first, then attention variants, then FFN ones."""
    pa, pf = parent_labels(lib, layer)
    atts = [a for a in lib.labels(layer, "attention") if a != pa]
    ffns = [f for f in lib.labels(layer, "ffn") if f != pf]
    out = [Replacement(layer, pa, pf)] + [Replacement(layer, a, pf) for a in atts] + [Replacement(layer, pa, f) for f in ffns]
    if pairs == "exact":
        out += [Replacement(layer, a, f) for a in atts for f in ffns]
    return out


class LayerModules:
    """(sub-block, label) -> the variant's module of one layer (a DecoderBlock holding only that sub-block),
    float32 on ``device``, read from the library when first asked for. The parent's own halves stay; of
    the other variants only the last one asked for is kept, so a layer never holds all its variants
    (for a 405B parent they are 11 B parameters). ``keep``: more (sub-block, label) kept once loaded (a
    context child's own halves, :mod:`puzzle.scoring.context`)."""

    def __init__(self, lib: Library, layer: int, *, initial: bool, device: Any = "cpu",
                 keep: tuple[tuple[str, str], ...] = ()) -> None:
        self.lib, self.layer, self.initial, self.device = lib, layer, initial, device
        self.parent = set(zip(("attention", "ffn"), parent_labels(lib, layer))) | set(keep)
        self.loaded: dict[tuple[str, str], nn.Module] = {}

    def __getitem__(self, key: tuple[str, str]) -> nn.Module:
        if key not in self.loaded:
            for k in [k for k in self.loaded if k not in self.parent]:
                del self.loaded[k]
            sub, label = key
            with torch.device("meta"):  # no random init: every tensor comes from the library
                m = build_module(Variant(self.layer, sub, parse_variant(label, sub)), self.lib.parent_config)
            m.load_state_dict(self.lib.variant_state(self.layer, sub, label, initial=self.initial), assign=True)
            self.loaded[key] = m.float().eval().requires_grad_(False).to(self.device)
        return self.loaded[key]


def layer_modules(lib: Library, layer: int, *, initial: bool, device: Any = "cpu",
                  keep: tuple[tuple[str, str], ...] = ()) -> LayerModules:
    """The variants of ``layer``, loaded one at a time as they are used (see :class:`LayerModules`)."""
    return LayerModules(lib, layer, initial=initial, device=device, keep=keep)


def _block_output(rep: Replacement, cache: ParentCache, modules: LayerModules,
                  ctx: dict[str, Any], attn_out: dict[str, torch.Tensor], parent_attention: str) -> torch.Tensor:
    """The replaced block's output (N, T, H) on the cached input of its layer."""
    l = rep.layer
    if rep.attention == parent_attention:
        h = cache.mids[l]  # the parent's own attention half: already computed by the parent pass
    else:
        if rep.attention not in attn_out:  # exact mode reuses one attention output for every FFN
            attn_out[rep.attention] = modules[("attention", rep.attention)](cache.inputs[l], ctx)
        h = attn_out[rep.attention]
    return modules[("ffn", rep.ffn)](h, ctx)


def block_outputs(reps: list[Replacement], cache: ParentCache, modules: LayerModules,
                  ctx: dict[str, Any], attn_out: dict[str, torch.Tensor], parent_attention: str) -> torch.Tensor:
    """The replaced blocks of one layer on its cached input, stacked along the batch: (K * N, T, H)."""
    ys = [_block_output(r, cache, modules, ctx, attn_out, parent_attention) for r in reps]
    return ys[0] if len(ys) == 1 else torch.cat(ys)


def group_metrics(runner: ParentRunner, cache: ParentCache, reps: list[Replacement],
                  final: torch.Tensor) -> list[dict[str, Any]]:
    """The rows of a group from its last residual stream (K * N, T, H): head, log-probs, metrics."""
    N, l = cache.ids.shape[0], reps[0].layer
    rows = []
    for k, rep in enumerate(reps):
        sums = TokenSums()
        for sl, lp in runner.logprob_chunks(final[k * N:(k + 1) * N]):
            sums.add(cache.logprobs[sl], lp, cache.labels[sl])
        m = sums.means()
        bad = {name: v for name, v in m.items() if not math.isfinite(v)}
        if bad:
            raise NumericalError(f"layer {l}, block {rep.label}: {bad} is not finite; the variant's weights or "
                                 "activations overflow (is the library corrupt? rebuild or retrain it)")
        rows.append({"attention": rep.attention, "ffn": rep.ffn, **m, "tokens": sums.tokens})
    return rows


@torch.no_grad()
def score_group(runner: ParentRunner, cache: ParentCache, reps: list[Replacement],
                modules: LayerModules, ctx: dict[str, Any],
                attn_out: dict[str, torch.Tensor], parent_attention: str) -> list[dict[str, Any]]:
    """Measure replacements of one layer together, stacked along the batch: (K * N, T, H)."""
    ys = block_outputs(reps, cache, modules, ctx, attn_out, parent_attention)
    final = runner.suffix(ys, reps[0].layer + 1, ctx)  # (K * N, T, H)
    return group_metrics(runner, cache, reps, final)


def layer_groups(reps: list[Replacement], variant_batch: int) -> list[list[Replacement]]:
    """How a layer's replacements run: the parent's own block alone, in the reference pass's shapes (so
    its KL is exactly 0), then the others ``variant_batch`` at a time."""
    return [reps[:1]] + [reps[i:i + variant_batch] for i in range(1, len(reps), variant_batch)]


def layer_cost(num_replacements: int, layer: int, num_layers: int) -> dict[str, int]:
    """What a layer's replacements run: each its block and the L - 1 - l layers after it, and one head."""
    return {"replacements": num_replacements, "layer_forwards": num_replacements * (num_layers - layer),
            "head_evals": num_replacements}
