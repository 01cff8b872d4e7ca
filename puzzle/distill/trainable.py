"""Which of a child's weights GKD trains (``GKDConfig.train``), by name for the run and by count for the plan.

    names = trained_names(child, parent.config, "replaced")     # the parameters the optimizer gets
    split = param_split(child.config, parent.config, "replaced")
    split.trained, split.frozen                                  # 37.8 M, 810 M for the 1B proof's child

=========  ===================================================================================
all        every weight (the default)
decoder    every decoder layer and the final norm; the embedding and the LM head frozen
replaced   the sub-blocks that differ from the parent's (:func:`~puzzle.distill.subblocks.replaced_subblocks`),
           each with its norm, as child-aware BLD trains them; the parent's own sub-blocks, the final norm
           and the embedding / LM head frozen
=========  ===================================================================================

A frozen weight gets no gradient and no AdamW moments: a rank holds 4 bytes of it (its fp32 shard) instead of 16,
which is what the memory plan's fallbacks (:func:`puzzle.search.stages.gkd.memory_options`) buy when the whole
student does not fit. The counts follow :mod:`puzzle.summary` (a sub-block's parameters include its norm), from the
configs alone, so the plan needs no weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from puzzle.distill.config import TRAIN
from puzzle.distill.subblocks import SUBBLOCKS, replaced_subblocks
from puzzle.errors import ConfigError

EDGES = ("model.embed_tokens.", "lm_head.")
"""The embedding and the LM head (one tensor when tied): frozen unless ``train`` is ``all``."""


def trained_subblocks(child_config: Any, parent_config: Any) -> list[tuple[int, str]]:
    """``(layer, "attention" | "ffn")`` of the child's replaced sub-blocks (neither the parent's own nor a no-op)."""
    if len(child_config.blocks) != len(parent_config.blocks):
        raise ConfigError(f"GKD's train='replaced' needs the child's layers to be the parent's: the child has "
                          f"{len(child_config.blocks)}, the parent {len(parent_config.blocks)} (a fused child); "
                          "train 'decoder' or 'all' (in a search: more memory per rank), or fuse nothing "
                          "(--fuse-threshold 0)")
    return replaced_subblocks(SimpleNamespace(config=child_config), SimpleNamespace(config=parent_config))


def trained_names(model: Any, parent_config: Any, train: str) -> list[str]:
    """Names of ``model``'s parameters that ``train`` trains, in ``named_parameters`` order (a tied head once, as the
    embedding). ``parent_config`` decides which sub-blocks are replaced."""
    if train not in TRAIN:
        raise ConfigError(f"train must be one of {TRAIN}, got {train!r}")
    names = [name for name, _ in model.named_parameters()]
    if train == "all":
        return names
    if train == "decoder":
        return [n for n in names if not n.startswith(EDGES)]
    prefixes = tuple(f"model.layers.{l}.{module}." for l, sub in trained_subblocks(model.config, parent_config)
                     for module in SUBBLOCKS[sub])
    return [n for n in names if n.startswith(prefixes)]


def freeze(model: Any, trained: list[str]) -> None:
    """``requires_grad`` True on the parameters named in ``trained``, False on every other one (tied ones included)."""
    keep = set(trained)
    for name, p in model.named_parameters(remove_duplicate=False):
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        p.requires_grad_(name in keep)


@dataclass(frozen=True)
class ParamSplit:
    """A child's parameters by where FSDP2 holds them: per decoder layer and at the edges (embedding, LM head, final
    norm: the root unit when the head is tied), each as ``(trained, frozen)``."""

    layers: tuple[tuple[int, int], ...]
    edges: tuple[int, int]
    tied: bool

    @property
    def trained(self) -> int:
        return sum(t for t, _ in self.layers) + self.edges[0]

    @property
    def frozen(self) -> int:
        return sum(f for _, f in self.layers) + self.edges[1]


def param_split(child_config: Any, parent_config: Any, train: str) -> ParamSplit:
    """The child's trained and frozen parameter counts under ``train``, from the configs alone."""
    from puzzle.summary import attention_params, ffn_params

    if train not in TRAIN:
        raise ConfigError(f"train must be one of {TRAIN}, got {train!r}")
    replaced = set(trained_subblocks(child_config, parent_config)) if train == "replaced" else set()
    layers = []
    for l, b in enumerate(child_config.blocks):
        sizes = {"attention": attention_params(b.attention, child_config), "ffn": ffn_params(b.ffn, child_config)}
        trained = sum(n for sub, n in sizes.items() if train != "replaced" or (l, sub) in replaced)
        layers.append((trained, sum(sizes.values()) - trained))
    V, H, tied = child_config.vocab_size, child_config.hidden_size, bool(child_config.tie_word_embeddings)
    edges, norm = V * H * (1 if tied else 2), H
    if train == "all":
        split = (edges + norm, 0)
    else:
        split = (norm, edges) if train == "decoder" else (0, edges + norm)
    return ParamSplit(tuple(layers), split, tied)
