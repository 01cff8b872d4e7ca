"""The child-stream refit (:mod:`puzzle.distill.child_refit`) with the layers split over the ``torchrun`` ranks.

    rank 0: embed the refit's ids; refit its layers -> send the streams -> rank 1: refit its layers -> ...

A rank refits its layers either *whole* (:func:`refit_whole`: the rank's layers of child and parent already
loaded for the training, refit in place) or *one layer at a time* (:func:`refit_by_layer`: each layer of child and
parent read, refit, its FFN written to ``work/refit/L012.safetensors`` for the training's rounds to read, freed),
when the rank trains its layers in rounds or the refit's streams and Gram do not fit beside all of them
(:mod:`puzzle.distill.child_bld_memory`). Both run :func:`~puzzle.distill.child_refit.refit_layers` on the same
streams in the same order, so they give the same weights. An error is returned, not raised: the rank passes zeros
on, and the caller raises it on every rank once the streams have passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from block_library.distributed import Shard
from puzzle.distill.child_bld import ChildBLDConfig
from puzzle.distill.child_bld_files import Reader, place, subblock_tensors
from puzzle.distill.child_refit import RefitResult, refit_context, refit_layers

Streams = tuple[list[torch.Tensor], list[torch.Tensor]]
"""The child's stream and (with drift) the parent's, in chunks of ``batch`` sequences (b, T, H)."""


def refit_file(directory: Path, layer: int) -> Path:
    """Layer ``layer``'s FFN (its norm and body) after a refit that ran one layer at a time."""
    return directory / "refit" / f"L{layer:03d}.safetensors"


@torch.no_grad()
def refit_whole(mine: Any, theirs: Any, shard: Shard, ids: torch.Tensor, config: ChildBLDConfig, run: range,
                todo: list[int], progress: bool, *, host: bool = False) -> tuple[RefitResult, BaseException | None]:
    """This rank's part of the refit with its layers ``run`` of child and parent loaded (``mine``, ``theirs``;
    rank 0: their embeddings, one module when the child's is the parent's): refit in place (``host``: the Gram and
    elimination in host RAM)."""
    result = RefitResult(layers=todo, tokens=ids.numel(), seconds=0.0)
    if not todo or shard.layers.start > todo[-1]:
        return result, None
    t0 = time.perf_counter()
    embed = (mine.model.embed_tokens, theirs.model.embed_tokens if config.refit_drift else None)
    stream, pstream = _streams_in(shard, ids, config, int(mine.config.hidden_size), lambda: embed)
    error = None
    try:
        stream, pstream = refit_layers(mine, theirs, run, stream, pstream, refit_context(mine.model, ids.shape[1],
                                       shard.device), todo, ridge=config.refit_ridge, drift=config.refit_drift,
                                       select=config.refit_select, result=result, progress=progress, host=host)
    except Exception as e:  # noqa: BLE001 - raised on every rank after the refit; the next rank waits for streams
        error = e
    _streams_out(shard, (stream, pstream), todo, error)
    result.seconds = time.perf_counter() - t0
    return result, error


@torch.no_grad()
def refit_by_layer(read: Reader, parent: Any, shard: Shard, ids: torch.Tensor, config: ChildBLDConfig, run: range,
                   todo: list[int], directory: Path, *, hidden: int, progress: bool, shared: bool = False,
                   host: bool = False) -> tuple[RefitResult, BaseException | None, list[int]]:
    """This rank's part of the refit one layer at a time: the child's layers from ``read``, the parent's from its
    directory (rank 0: the child's embedding for both streams when ``shared``, the child's being the parent's),
    each refit layer's FFN written to :func:`refit_file`; ``host``: the Gram and elimination in host RAM. Returns
    the result, the error and the layers written."""
    from block_library.artifact import write_state
    from puzzle.loading import load_layers

    result = RefitResult(layers=todo, tokens=ids.numel(), seconds=0.0)
    if not todo or shard.layers.start > todo[-1]:
        return result, None, []
    t0, device, drift = time.perf_counter(), shard.device, config.refit_drift
    error: BaseException | None = None

    def embeddings() -> tuple[Any, Any]:
        child = place(read([], True, False), [], True, device).model.embed_tokens
        if not drift or shared:
            return child, child if drift else None
        return child, place(load_layers(parent, [], embed=True), [], True, device).model.embed_tokens

    try:
        stream, pstream = _streams_in(shard, ids, config, hidden, embeddings)
    except Exception as e:  # noqa: BLE001 - rank 0 could not read its embeddings: zeros go on
        error, stream, pstream = e, *_zeros(ids, config, hidden, device)
    written = []
    for l in tqdm([l for l in run if l <= todo[-1]], desc="child refit", unit="layer", disable=not progress):
        if error is not None:
            break
        try:
            mine = place(read(range(l, l + 1), False, False), [l], False, device)
            theirs = place(load_layers(parent, [l]), [l], False, device)
            stream, pstream = refit_layers(mine, theirs, range(l, l + 1), stream, pstream,
                                           refit_context(mine.model, ids.shape[1], device), todo,
                                           ridge=config.refit_ridge, drift=drift, select=config.refit_select,
                                           result=result, host=host)
            if l in todo:
                ffn = torch.nn.ModuleDict({n: getattr(mine.model.layers[l], n) for n in ("post_attention_layernorm",
                                                                                       "mlp")})
                write_state(subblock_tensors({"ffn": ffn}, {"ffn": (l, "ffn")}), refit_file(directory, l))
                written.append(l)
            del mine, theirs
        except Exception as e:  # noqa: BLE001 - raised on every rank after the refit
            error = e
    _streams_out(shard, (stream, pstream), todo, error)
    result.seconds = time.perf_counter() - t0
    return result, error, written


def merged_refit(results: list[RefitResult]) -> RefitResult:
    """The ranks' refit results as one: every layer's errors; the time of the rank that finished last."""
    out = RefitResult(layers=results[0].layers, tokens=results[0].tokens, seconds=max(r.seconds for r in results))
    for r in results:
        out.error_before.update(r.error_before)
        out.error_after.update(r.error_after)
    return out


def _streams_in(shard: Shard, ids: torch.Tensor, config: ChildBLDConfig, hidden: int,
                embeddings: Callable[[], tuple[Any, Any]]) -> Streams:
    """The streams entering this rank's layers: ``ids`` embedded on rank 0 (``embeddings()``: the child's and,
    with drift, the parent's embedding), received elsewhere."""
    (N, T), B = ids.shape, config.batch
    if shard.first:
        child, parent = embeddings()
        chunks = [ids[i:i + B].to(shard.device) for i in range(0, N, B)]
        return [child(c) for c in chunks], [parent(c) for c in chunks] if config.refit_drift else []  # (b, T, H)
    stream: list[torch.Tensor] = []
    pstream: list[torch.Tensor] = []
    for i in range(0, N, B):  # in the order they are sent: the child's chunk, then the parent's
        stream.append(shard.recv((min(B, N - i), T, hidden), torch.float32))
        pstream += [shard.recv((min(B, N - i), T, hidden), torch.float32)] if config.refit_drift else []
    return stream, pstream


def _streams_out(shard: Shard, streams: Streams, todo: list[int], error: BaseException | None) -> None:
    """Send the streams leaving this rank's layers while a later rank has layers to refit (zeros after an error)."""
    if shard.layers.stop > todo[-1]:
        return
    stream, pstream = streams
    if error is not None:
        stream, pstream = [torch.zeros_like(x) for x in stream], [torch.zeros_like(p) for p in pstream]
    for i, x in enumerate(stream):
        shard.send(x)
        if pstream:
            shard.send(pstream[i])


def _zeros(ids: torch.Tensor, config: ChildBLDConfig, hidden: int, device: torch.device) -> Streams:
    (N, T), B = ids.shape, config.batch
    stream = [torch.zeros(min(B, N - i), T, hidden, device=device) for i in range(0, N, B)]
    return stream, [torch.zeros_like(x) for x in stream] if config.refit_drift else []
