"""The files of layer-sharded child-aware BLD (:mod:`puzzle.distill.child_bld_sharded`): checkpoints, loss rows,
the refit's layers, the ranks' trained tensors and the child's runtime directory, and the few collectives that keep
the ranks in step.

    work/ckpt/rank1/a/...                 rank 1's checkpoints (block_library.checkpoint), in two roots used in turn
    work/ckpt/rank1/b/...
    work/ckpt/rank1/L010/{a,b,w}/...      the same per round, when rank 1 trains its layers in rounds (from layer 10)
    work/rows/L010.jsonl                  the loss rows of the round from layer 10 (one JSON object a line)
    work/refit/L012.safetensors           layer 12's FFN after the refit, when it ran one layer at a time
    work/trained/rank1.safetensors        rank 1's trained sub-blocks by runtime name, once training is done
    work/trained/rank1.L010.safetensors   ... of its round from layer 10 (rounds)
    out/                                  the child (runtime directory), written by rank 0

Checkpoints: the ranks run ahead of each other (a pipeline), so when one writes step ``s`` the one after it may
still be at an earlier step, and a kill leaves them at different steps. Each round (a rank's layers, or one round
of them) therefore keeps its last two *resume* checkpoints, every ``period`` steps, in two roots used in turn (each
one :mod:`block_library.checkpoint`'s files, committed as usual); a rerun resumes from the latest step that every
round of every rank holds, read from whichever root holds it. No checkpoint needs the ranks to wait for each other,
so the pipeline never drains. Without rounds ``period`` is ``checkpoint_every``: a rank is never more than a step or
two ahead of the next (every send waits for its receiver), so two roots hold a common step whenever
``checkpoint_every`` is larger than that; otherwise the rerun starts over. With rounds, every round also writes its
state at the end of each window of steps into a third root ``w`` (the next window starts from it), and ``period``
is ``world`` windows (:func:`puzzle.distill.child_bld_memory.resume_period`): ranks stay within that many windows
of one another, so the two resume roots always share a step.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from block_library.distributed import Shard

SLOTS = ("a", "b")
"""Each round's two resume roots, used in turn."""
WINDOW = "w"
"""A round's root of the other window ends (rounds only): the state the next window loads."""
Reader = Callable[[Sequence[int], bool, bool], Any]
"""``read(layers, embed, head)``: a model with only those parts read (the rest on the meta device)."""


def place(model: Any, layers: Sequence[int], embed: bool, device: torch.device) -> Any:
    """``model``'s real parts (its ``layers``, the RoPE table, the embedding when read) on ``device``, frozen."""
    body = model.model
    for m in [body.layers[l] for l in layers] + [body.rotary_emb] + ([body.embed_tokens] if embed else []):
        m.to(device)
    return model.eval().requires_grad_(False)


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


def round_root(directory: Path, rank: int, layers: range | None = None) -> Path:
    """The checkpoints of ``rank`` (``layers``: of its round of those layers, when it trains in rounds)."""
    root = directory / "ckpt" / f"rank{rank}"
    return root if layers is None else root / f"L{layers.start:03d}"


def slot(step: int, period: int, last: int) -> str:
    """The root of the checkpoint of ``step``: the resume roots in turn, one per ``period`` steps (the last step's
    counted as a period's end), :data:`WINDOW` for the other window ends."""
    return SLOTS[-(-step // period) % 2] if step % period == 0 or step == last else WINDOW


def held_steps(root: Path, tag: str) -> set[int]:
    """The steps of ``tag`` a round's roots hold."""
    from block_library import checkpoint

    return {checkpoint.latest_step(root / s, tag) for s in (*SLOTS, WINDOW)} - {0}


def root_of(root: Path, step: int, tag: str) -> Path:
    """The root among a round's that holds ``step`` of ``tag``."""
    from block_library import checkpoint
    from puzzle.errors import CorruptArtifactError

    for s in (*SLOTS, WINDOW):
        if checkpoint.latest_step(root / s, tag) == step:
            return root / s
    raise CorruptArtifactError(f"{root} holds no checkpoint of step {step}; delete it to restart child-aware BLD")


def resume_step(shard: Shard, roots: Sequence[Path], tag: str) -> int:
    """The latest step of ``tag`` that every round holding trained sub-blocks (``roots``: this rank's) has
    checkpointed, or 0 (a collective)."""

    def mine() -> set[int] | None:
        sets = [held_steps(r, tag) for r in roots]
        return set.intersection(*sets) if sets else None

    common: set[int] | None = None
    for steps in all_ranks(shard, agree(shard, mine)):
        if steps is not None:
            common = steps if common is None else common & steps
    return max(common) if common else 0


# ------------------------------------------------------------------------------------------------ loss rows


def rows_file(directory: Path, layers: range) -> Path:
    return directory / "rows" / f"L{layers.start:03d}.jsonl"


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Add ``rows`` to a round's file (before its checkpoint is committed: a rerun drops rows past its start)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()


def read_rows(path: Path, before: int | None = None) -> list[dict[str, Any]]:
    """A round's rows (of the steps before ``before``); none when it has no file."""
    import json

    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
            # a kill while appending: the rows of a checkpoint never committed, past any step a run resumes from
    return [r for r in rows if before is None or r["step"] < before]


def keep_rows(path: Path, before: int) -> None:
    """Cut a round's file to the rows of the steps before ``before`` (the step a run starts from)."""
    import json

    from puzzle.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in read_rows(path, before)))


# ------------------------------------------------------------------------------------------------ output


def subblock_tensors(modules: dict[str, torch.nn.Module], parts: dict[str, tuple[int, str]]) -> dict[str, torch.Tensor]:
    """The tensors of trained sub-blocks (key -> modules of one layer's norm and body) by runtime name."""
    out = {}
    for key, module in modules.items():
        layer = parts[key][0]
        for name, t in module.state_dict().items():
            out[f"model.layers.{layer}.{name}"] = t.detach().cpu()
    return out


def rank_file(directory: Path, rank: int, layers: range | None = None) -> Path:
    """The trained tensors of ``rank`` (``layers``: of its round of those layers)."""
    tail = "" if layers is None else f".L{layers.start:03d}"
    return directory / "trained" / f"rank{rank}{tail}.safetensors"


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
