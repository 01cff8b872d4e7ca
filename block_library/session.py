"""What build and train share: the parent on this process's shard, the variants, validation.

The normalized MSE of a variant on a set of tokens is

    NMSE = sum_t ||y_t - y_parent_t||^2 / sum_t ||y_parent_t||^2

with ``y = x + sub_block(norm(x))`` the residual stream after the sub-block (so a no-op scores
``||sub_block_parent||^2 / ||y_parent||^2``, the parent sub-block's relative output energy).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from block_library.config import LibraryConfig
from block_library.distributed import Shard, init_shard
from block_library.space import LayerVariants
from block_library.teacher import Teacher, batches_of, run_pass
from block_library.variant import Variant, build_module
from puzzle.loading import Source, load_config, load_layers, resolve_source
from puzzle.model import PuzzleConfig
from puzzle.summary import attention_params, ffn_params

log = logging.getLogger(__name__)


def nmse_sums(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum ||pred - target||^2, sum ||target||^2)`` in float32."""
    return (pred.float() - target.float()).pow(2).sum(), target.float().pow(2).sum()


def variants_of(lv: LayerVariants) -> list[Variant]:
    """The variants of one layer, attention first, the parent's own first in each sub-block."""
    out = [Variant(lv.layer, "attention", a, is_parent=(j == 0)) for j, a in enumerate(lv.attention)]
    out += [Variant(lv.layer, "ffn", f, is_parent=(j == 0)) for j, f in enumerate(lv.ffn)]
    return out


def variant_params(v: Variant, config: PuzzleConfig) -> int:
    return attention_params(v.config, config) if v.subblock == "attention" else ffn_params(v.config, config)


@dataclass
class Session:
    source: Source
    config: LibraryConfig
    parent_config: PuzzleConfig
    shard: Shard
    teacher: Teacher
    layer_variants: list[LayerVariants]
    compute_dtype: torch.dtype
    """The teacher's dtype (and the autocast dtype of variants on GPU)."""
    shared: dict[str, torch.Tensor]
    """Rank 0: the parent's embedding, final norm and untied LM head (CPU, as loaded), for the library."""

    def variants(self, layer: int) -> list[Variant]:
        return variants_of(self.layer_variants[layer])

    def owned_variants(self) -> list[Variant]:
        return [v for l in self.shard.layers for v in self.variants(l)]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.shard.device.type == "cuda" and self.compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def new_module(self, v: Variant) -> nn.Module:
        return build_module(v, self.parent_config).to(self.shard.device, torch.float32)


TOKENIZER_FINGERPRINT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                               "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
"""The tokenizer files that decide which tokens the data becomes (so a parent's results depend on them)."""


def parent_fingerprint(source: Source, *, verify: bool = False) -> str:
    """sha256 of what every result from a parent depends on: its config.json, the bytes of each weight
    file and of its tokenizer files (and, for a hub snapshot, the commit it is of). A parent re-trained in place
    with the same sizes changes it.

    The weight files' hashes are cached by file identity (:func:`puzzle.parents.hashes.content_sha256`:
    a few seconds once for SmolLM2, nothing read after); ``verify`` reads every byte again."""
    import hashlib

    from puzzle.io import safetensors_files
    from puzzle.parents.hashes import content_sha256
    from puzzle.parents.hub import snapshot_of

    h = hashlib.sha256((source.directory / "config.json").read_bytes())
    if (snap := snapshot_of(source.directory)) is not None:  # a hub snapshot: the commit it is of
        h.update(f"hub:{snap[0]}@{snap[1]}".encode())
    for f in safetensors_files(source.directory):
        h.update(f"{f.name}:{content_sha256(f, verify=verify)}".encode())
    for name in TOKENIZER_FINGERPRINT_FILES:
        if (source.directory / name).is_file():
            h.update(f"{name}:{hashlib.sha256((source.directory / name).read_bytes()).hexdigest()}".encode())
    return h.hexdigest()


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def open_session(source: str | Source, config: LibraryConfig) -> Session:
    """Resolve the space from the parent's config, join the process group and read this rank's layers.

    Each rank reads only the parent tensors it runs (:func:`puzzle.loading.load_layers`): its
    layers, plus on rank 0 the embedding, final norm and LM head (the library's ``shared`` file).
    """
    src = resolve_source(source)
    pc = load_config(src)
    lvs = config.space.layer_variants(pc.blocks, num_attention_heads=pc.num_attention_heads)
    # Balance ranks by the parameters each layer runs per step: the parent layer plus trainable variants.
    costs = [sum(variant_params(v, pc) * (3 if v.trainable else 1) for v in variants_of(lv)) for lv in lvs]
    shard = init_shard(costs, device=config.bld.device)
    dtype = _compute_dtype(config.bld.dtype, shard.device)
    model = load_layers(src, shard.layers, embed=shard.first, head=shard.first)
    shared = {}
    if shard.first:  # frozen and never written in place, so the teacher's CPU embedding may share it
        shared = {"model.embed_tokens.weight": model.model.embed_tokens.weight.detach(),
                  "model.norm.weight": model.model.norm.weight.detach()}
        if not pc.tie_word_embeddings:
            shared["lm_head.weight"] = model.lm_head.weight.detach()
    teacher = Teacher(model, shard, dtype=dtype)
    del model
    return Session(source=src, config=config, parent_config=pc, shard=shard, teacher=teacher,
                   layer_variants=lvs, compute_dtype=dtype, shared=shared)


def load_ids(session: Session, split: str, num_sequences: int, *, offset: int = 0) -> tuple[torch.Tensor | None, int]:
    """Rank 0 reads ``num_sequences`` packed sequences (after skipping ``offset``); all ranks learn how many."""
    from puzzle.data import load_sequences
    from puzzle.loading import load_tokenizer

    ids = None
    if session.shard.first:
        d = session.config.data
        tok = load_tokenizer(session.source)
        ids = load_sequences(list(d.sources), tok, seq_len=d.seq_len, num_sequences=offset + num_sequences,
                             split=split, val_fraction=d.val_fraction)[offset:]
        if ids.shape[0] == 0:
            from puzzle.errors import DataError

            raise DataError(f"the {split} split of {list(d.sources)} has no sequences after the first {offset}; add data")
    n = session.shard.broadcast(int(ids.shape[0]) if ids is not None else 0)
    return ids, n


@torch.no_grad()
def validate(session: Session, modules: dict[str, nn.Module], ids: torch.Tensor | None, n: int,
             *, progress: Any = None) -> dict[str, float]:
    """Validation NMSE of every owned variant (the parent's own: 0 by construction, not run)."""
    sums: dict[str, list[float]] = {}
    by_layer: dict[int, list[tuple[Variant, nn.Module | None]]] = {}
    for v in session.owned_variants():
        by_layer.setdefault(v.layer, []).append((v, None if v.is_parent else modules.get(v.key)))

    def visit(l: int, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, ctx: dict[str, Any]) -> None:
        for v, m in by_layer[l]:
            if m is None:
                continue
            inp, target = (x, h) if v.subblock == "attention" else (h, y)
            with session.autocast():
                out = m(inp.float() if session.compute_dtype == torch.float32 else inp, ctx)
            e, en = nmse_sums(out, target)
            acc = sums.setdefault(v.key, [0.0, 0.0])
            acc[0] += float(e)
            acc[1] += float(en)

    bs = session.config.bld.batch_size
    batches = batches_of(ids, n, bs, session.config.data.seq_len, first=session.shard.first)
    run_pass(session.teacher, _tick(batches, progress), visit)
    out = {v.key: 0.0 for v in session.owned_variants() if v.is_parent}
    out.update({k: (e / en if en > 0 else 0.0) for k, (e, en) in sums.items()})
    return out


def _tick(items: list[Any], bar: Any) -> Iterator[Any]:
    for it in items:
        yield it
        if bar is not None:
            bar.update(1)
