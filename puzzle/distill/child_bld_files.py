"""The files of layer-sharded child-aware BLD (:mod:`puzzle.distill.child_bld_sharded`): checkpoints, the ranks'
trained tensors and the child's runtime directory, and the few collectives that keep the ranks in step.

    work/ckpt/rank1/a/...           rank 1's checkpoints (block_library.checkpoint), alternating between two roots
    work/ckpt/rank1/b/...
    work/trained/rank1.safetensors  rank 1's trained sub-blocks by runtime name, once training is done
    out/                            the child (runtime directory), written by rank 0

Checkpoints: the ranks run ahead of each other (a pipeline), so when one writes step ``s`` the one after it may
still be at an earlier step, and a kill leaves them at different steps. Each rank therefore keeps its last two
checkpoints, in two roots used in turn (each one :mod:`block_library.checkpoint`'s files, committed as usual); a
rerun resumes from the latest step that every rank holds, read from whichever root holds it. No checkpoint needs
the ranks to wait for each other, so the pipeline never drains. A rank is never more than a step or two ahead of
the next (every send waits for its receiver), so two roots hold a common step whenever ``checkpoint_every`` is
larger than that; otherwise the rerun starts over.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from block_library.distributed import Shard

SLOTS = ("a", "b")
"""Each rank's two checkpoint roots, used in turn."""
Reader = Callable[[Sequence[int], bool, bool], Any]
"""``read(layers, embed, head)``: a model with only those parts read (the rest on the meta device)."""


def all_ranks(shard: Shard, obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (a collective: every rank calls it)."""
    if shard.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * shard.world
    dist.all_gather_object(out, obj)
    return out


def raise_any(shard: Shard, error: BaseException | None) -> None:
    """Raise on every rank the error of the first rank that had one (its own on a rank that had one), so that no
    rank waits for the others forever; a collective."""
    errors = all_ranks(shard, _portable(error))
    if error is not None:
        raise error
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def _portable(error: BaseException | None) -> BaseException | None:
    """``error``, or one that pickles with its type and message (gathering must not fail on the rank that failed)."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - an exception type whose arguments do not round-trip
        return RuntimeError(f"{type(error).__name__}: {error}")


def agree(shard: Shard, fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; an exception on any raised on all (:func:`raise_any`)."""
    value, error = None, None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - every rank raises it below
        error = e
    raise_any(shard, error)
    return value


# ------------------------------------------------------------------------------------------------ checkpoints


def slot_root(directory: Path, rank: int, step: int, every: int) -> Path:
    """The root of ``rank``'s checkpoint of ``step``: the two roots in turn, one per checkpoint
    (``ceil(step / every)`` checkpoints so far, the last step's included)."""
    return directory / "ckpt" / f"rank{rank}" / SLOTS[-(-step // every) % 2]


def resume_step(shard: Shard, directory: Path, tag: str, holds: bool) -> int:
    """The latest step of ``tag`` that every rank holding trained sub-blocks (``holds``) has checkpointed, or 0."""
    from block_library import checkpoint

    def mine() -> set[int] | None:
        root = directory / "ckpt" / f"rank{shard.rank}"
        return {checkpoint.latest_step(root / s, tag) for s in SLOTS} - {0} if holds else None

    common: set[int] | None = None
    for steps in all_ranks(shard, agree(shard, mine)):
        if steps is not None:
            common = steps if common is None else common & steps
    return max(common) if common else 0


# ------------------------------------------------------------------------------------------------ output


def subblock_tensors(modules: dict[str, torch.nn.Module], parts: dict[str, tuple[int, str]]) -> dict[str, torch.Tensor]:
    """The tensors of trained sub-blocks (key -> modules of one layer's norm and body) by runtime name."""
    out = {}
    for key, module in modules.items():
        layer = parts[key][0]
        for name, t in module.state_dict().items():
            out[f"model.layers.{layer}.{name}"] = t.detach().cpu()
    return out


def rank_file(directory: Path, rank: int) -> Path:
    return directory / "trained" / f"rank{rank}.safetensors"


class _Layers:
    """A child's tensors by runtime name, read one decoder layer at a time (``read(layers, embed, head)`` -> a model
    with those parts; the rest on meta), the embedding, final norm and head once."""

    def __init__(self, read: Reader) -> None:
        self.read, self.layer = read, -1
        self.state: dict[str, torch.Tensor] = {}
        self.ends: dict[str, torch.Tensor] | None = None

    def __call__(self, name: str) -> torch.Tensor:
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            if layer != self.layer:
                self.state = {}
                gc.collect()
                prefix = f"model.layers.{layer}."
                self.state = {k: v for k, v in self.read([layer], False, False).state_dict().items()
                              if k.startswith(prefix)}
                self.layer = layer
            return self.state[name]
        if self.ends is None:
            self.ends = {k: v for k, v in self.read([], True, True).state_dict().items()
                         if not k.startswith("model.layers.")}
        return self.ends[name]


def write_child(out_dir: Path, config: Any, read: Reader, trained: Sequence[Path]) -> Path:
    """The child's runtime directory (``save_runtime``'s files: safetensors of every runtime tensor in float32 and
    ``config.json``), atomically: the trained tensors from the ranks' files ``trained``, every other one from the
    child's source (``read``), one tensor in flight (and one layer read)."""
    from puzzle.io import atomic_directory, atomic_write_json, safetensors_header, save_safetensors_streamed
    from puzzle.loading import read_tensor, runtime_config_dict
    from puzzle.model.weights import meta_model, runtime_weight_names

    where = {name: path for path in trained for name in safetensors_header(path) if name != "__metadata__"}
    model = meta_model(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    specs = {k: (shapes[k], torch.float32) for k in runtime_weight_names(model)}
    source = _Layers(read)

    def tensor(name: str) -> torch.Tensor:
        if name in where:
            return read_tensor(where[name], name, dtype=torch.float32)
        return source(name).to(torch.float32)

    with atomic_directory(out_dir, overwrite=True) as tmp:
        save_safetensors_streamed(specs, tensor, tmp)
        atomic_write_json(tmp / "config.json", runtime_config_dict(config))
    return out_dir
