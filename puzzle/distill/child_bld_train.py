"""One rank's share of layer-sharded child-aware BLD's training steps: its layers in rounds, over windows of steps.

    training = RoundTraining(shard, config, directory, ids, rounds, parts, opener, window=W, period=P)
    start = training.resume()          # a collective: the step every round of every rank holds
    training.run(ids, start, progress=False, on_step=None)

Each window of ``W`` steps runs the rank's rounds in layer order (:mod:`puzzle.distill.child_bld_memory`)::

    round 0      embeds the ids (rank 0) or receives the streams     keeps its W output streams (host memory)
    round k      reads round k-1's streams                           overwrites them with its own
    last round   ...                                                 sends them to the next rank

A round loads its layers of child and parent, and its last checkpoint (weights and AdamW state), when its window
starts, and checkpoints and frees them when it ends. Each step of a round is the step of a rank without rounds on
those layers (:func:`~puzzle.distill.child_bld.step_layers`, the per-sub-block clip, the learning rate of the step,
AdamW per sub-block), so the weights are the same. One round keeps its layers loaded for the whole run and holds
no streams: the rank's steps run as they did before rounds (``W`` is then the whole run). An error on this rank (a
NaN loss, a bad file) is kept for the end; until then the rank passes zeros on, so no rank waits forever.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from block_library.distributed import Shard
from puzzle.distill.child_bld import ChildBLDConfig, fingerprint_modules, fingerprint_start, step_context, step_layers
from puzzle.distill.child_bld_files import (agree, all_ranks, append_rows, keep_rows, rank_file, resume_step, root_of,
                                            round_root, rows_file, slot, subblock_tensors)
from puzzle.distill.subblocks import SUBBLOCKS


@dataclass
class Opener:
    """How a round's models are read: ``child(layers, embed)`` (the refit's layers applied) and ``parent(layers)``,
    each placed on the rank's device; ``preloaded``: the rank's whole share when the refit already holds it."""

    child: Callable[[range, bool], Any]
    parent: Callable[[list[int]], Any]
    preloaded: tuple[Any, Any] | None = None


@dataclass
class _Held:
    """A round's loaded state: its models, trained sub-blocks and their AdamW, the rows since its last checkpoint."""

    mine: Any
    theirs: Any
    modules: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer | None
    ctx: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Round:
    layers: range
    named: dict[str, tuple[int, str]]
    root: Path
    rows: Path
    tensors: Path
    held: _Held | None = None


class RoundTraining:
    """One rank's rounds (``rounds``: contiguous, covering the layers it runs, up to the last trained one), their
    checkpoints and loss rows. ``windowed``: some rank trains in several rounds (checkpoints per round, resume every
    ``period`` steps); otherwise ``window`` is the run and ``period`` is ``checkpoint_every``."""

    def __init__(self, shard: Shard, config: ChildBLDConfig, directory: Path, ids: torch.Tensor,
                 rounds: Sequence[range], parts: list[tuple[int, str]], opener: Opener, *, hidden: int, window: int,
                 period: int, windowed: bool) -> None:
        self.shard, self.config, self.directory, self.opener, self.hidden = shard, config, directory, opener, hidden
        self.window, self.period, self.windowed = window, period, windowed
        self.need = max((l for l, _ in parts), default=-1)  # the last layer with a trained sub-block
        named = {f"L{l:03d}.{sub}": (l, sub) for l, sub in parts if l in shard.layers}
        self.rounds = [_Round(r, {k: p for k, p in named.items() if p[0] in r},
                              round_root(directory, shard.rank, r if windowed else None), rows_file(directory, r),
                              rank_file(directory, shard.rank, r if windowed else None)) for r in rounds]
        self.error: BaseException | None = None
        self.seconds = 0.0
        # what the run starts from on every rank (a collective): a checkpoint of other weights or splits is not resumed
        mine = agree(shard, lambda: self._fingerprint(list(named), ids))
        layout = [[r.start, r.stop] for r in rounds]
        self.tag = hashlib.sha256(json.dumps(all_ranks(shard, [mine, layout] if windowed else mine)).encode()
                                  ).hexdigest()

    def _fingerprint(self, keys: list[str], ids: torch.Tensor) -> str:
        """The settings, the trained sub-blocks' initial weights (a round of several read once here, a lone one kept
        loaded) and the ids: ``_fingerprint`` of the rank's sub-blocks."""
        h = fingerprint_start(self.config, keys)
        for r in self.rounds:
            if len(self.rounds) == 1:
                r.held = self._hold(r, first=True)
                fingerprint_modules(h, list(r.named), r.held.modules)
            else:
                child = self.opener.child(r.layers, False)
                fingerprint_modules(h, list(r.named), _modules(child, r.named))
                del child
        h.update(ids.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _hold(self, r: _Round, *, first: bool, parent: bool = True) -> _Held:
        """Round ``r``'s models (the preloaded ones, or read: the parent's layers with a trained sub-block, none
        without ``parent``) with an AdamW of its trained sub-blocks."""
        if self.opener.preloaded is not None:
            mine, theirs = self.opener.preloaded
        else:
            mine = self.opener.child(r.layers, self.shard.first and first)
            theirs = self.opener.parent(sorted({l for l, _ in r.named.values()}) if parent else [])
        modules = _modules(mine, r.named)
        groups = [{"params": list(m.parameters())} for m in modules.values()]
        optimizer = torch.optim.AdamW(groups, lr=self.config.lr, weight_decay=0.0) if groups else None
        cfg = self.config
        return _Held(mine, theirs, modules, optimizer, step_context(mine.model, cfg.step_batch, cfg.seq_len,
                                                                      self.shard.device))

    def resume(self) -> int:
        """The step to start from (0: none), a lone round's checkpoint loaded, each round's rows cut there, the
        trained tensors of an earlier run removed (a collective)."""
        from block_library import checkpoint

        start = resume_step(self.shard, [r.root for r in self.rounds if r.named], self.tag) if self.need >= 0 else 0

        def load() -> None:
            for r in self.rounds:
                r.tensors.unlink(missing_ok=True)  # a file of another split or child, left by an earlier run
                if r.named:
                    keep_rows(r.rows, start)
                else:
                    r.rows.unlink(missing_ok=True)  # rows of another child, left by an earlier run
                if start and r.held is not None and r.held.optimizer is not None:
                    checkpoint.load_layer(root_of(r.root, start, self.tag), start, r.layers.start, r.held.modules,
                                          r.held.optimizer)

        agree(self.shard, load)
        return start

    def run(self, ids: torch.Tensor, start: int, progress: bool, on_step: Callable[[int], None] | None) -> None:
        """Steps ``start`` to the last, window by window, round by round; the trained tensors of every round
        written once it has done the last step."""
        cfg, shard = self.config, self.shard
        steps = cfg.steps if self.need >= 0 else 0
        sends = shard.layers.stop <= self.need
        t0 = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=start, desc="child BLD", unit="step",
                   disable=not (progress and self.rounds and not sends))
        try:
            if not self.rounds:  # a rank past the last trained layer: nothing to run
                for step in range(start, steps):
                    if on_step is not None:
                        on_step(step)
            for w0 in range(start, steps, self.window):
                w1 = min(w0 + self.window, steps)
                streams: list[torch.Tensor | None] = [None] * (w1 - w0)  # (B, T, H) each, host memory
                for k, r in enumerate(self.rounds):
                    last = k == len(self.rounds) - 1
                    self._open(r, k, w0)
                    for step in range(w0, w1):
                        x = self._input(r, k, step, ids, streams[step - w0])
                        losses, out = self._forward(r, x)
                        out = out if out is not None else torch.zeros_like(x)
                        if not last:
                            streams[step - w0] = out.to("cpu")
                        elif sends:  # before this rank's update: the next one starts at once
                            shard.send(out)
                        self._update(r, step, losses)
                        if last:
                            bar.update(1)
                            bar.set_postfix(nmse=f"{sum(losses.values()) / max(1, len(losses)):.4f}")
                        if step + 1 == steps or (step + 1) % self.period == 0 or (
                                step + 1 == w1 and len(self.rounds) > 1):
                            self._checkpoint(r, step + 1, steps)
                        if last and on_step is not None:
                            on_step(step)
                    self._close(r)
            if start == steps:  # finished before: the checkpoints' weights
                for k, r in enumerate(self.rounds):
                    self._open(r, k, steps, parent=False)
                    self._write_tensors(r)
                    self._close(r)
        finally:
            bar.close()
        self.seconds = time.perf_counter() - t0

    def _open(self, r: _Round, k: int, step: int, *, parent: bool = True) -> None:
        """Round ``r`` ready to train from ``step``: read with its checkpoint of that step (a lone round stays
        loaded); an error is kept for the end."""
        from block_library import checkpoint

        if r.held is None and self.error is None:
            try:
                r.held = self._hold(r, first=k == 0, parent=parent)
                if step and r.held.optimizer is not None:
                    checkpoint.load_layer(root_of(r.root, step, self.tag), step, r.layers.start, r.held.modules,
                                          r.held.optimizer)
            except Exception as e:  # noqa: BLE001 - raised on every rank at the end
                self.error = e
        if r.held is not None:
            for m in r.held.modules.values():
                m.requires_grad_(True)
                m.train()

    def _close(self, r: _Round) -> None:
        """Free round ``r``'s models and AdamW state (kept when it is the rank's only round)."""
        if len(self.rounds) > 1:
            r.held = None
            from puzzle.peak import release_memory

            release_memory()
        elif r.held is not None:
            for m in r.held.modules.values():
                m.requires_grad_(False)
                m.eval()

    def _input(self, r: _Round, k: int, step: int, ids: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        """The stream entering round ``r`` at ``step`` (B, T, H): the ids embedded (rank 0's first round), received
        (another rank's first round) or the previous round's."""
        shard, B, T = self.shard, self.config.step_batch, self.config.seq_len
        if k > 0:
            return kept.to(shard.device)
        if not shard.first:
            return shard.recv((B, T, self.hidden), torch.float32)
        with torch.no_grad():
            if r.held is None:  # failed to load: zeros
                return torch.zeros(B, T, self.hidden, device=shard.device)
            embed = r.held.mine.model.embed_tokens  # on the device, or in host RAM (a lookup: the same rows)
            return embed(ids[step * B:(step + 1) * B].to(embed.weight.device)).to(shard.device)

    def _forward(self, r: _Round, x: torch.Tensor) -> tuple[dict[str, float], torch.Tensor | None]:
        """Round ``r``'s layers on the stream ``x``, their gradients accumulated: the losses and the stream out (None
        after an error, kept for the end)."""
        if self.error is None and r.held is not None:
            try:
                return step_layers(r.held.mine, r.held.theirs, r.layers, x, r.held.ctx, r.named)
            except Exception as e:  # noqa: BLE001 - raised on every rank at the end
                self.error = e
        return {}, None

    def _update(self, r: _Round, step: int, losses: dict[str, float]) -> None:
        """Clip each sub-block's gradient, step AdamW at the step's learning rate, record the losses."""
        cfg, held = self.config, r.held
        if self.error is not None or held is None or held.optimizer is None:
            return
        lr = cfg.lr_at(step, cfg.steps)
        for m in held.modules.values():  # one norm per sub-block
            cfg.clip(m.parameters())
        for g in held.optimizer.param_groups:
            g["lr"] = lr
        held.optimizer.step()
        held.optimizer.zero_grad(set_to_none=True)
        held.rows += [{"step": step, "subblock": k, "train_nmse": v, "lr": lr} for k, v in losses.items()]

    def _checkpoint(self, r: _Round, step: int, steps: int) -> None:
        """Round ``r``'s weights and AdamW state after ``step`` steps in the root of that step, its rows appended
        first; after the last step its trained tensors too (a failed write is raised on every rank at the end)."""
        from block_library import checkpoint

        held = r.held
        if self.error is not None or held is None or held.optimizer is None:
            return
        root = r.root / slot(step, self.period, steps)
        try:
            append_rows(r.rows, held.rows)
            held.rows = []
            checkpoint.save_layer(root, step, r.layers.start, held.modules, held.optimizer, {})
            checkpoint.commit(root, step, self.tag)
            if step == steps:
                self._write_tensors(r)
        except Exception as e:  # noqa: BLE001
            self.error = e

    def _write_tensors(self, r: _Round) -> None:
        """Round ``r``'s trained sub-blocks' tensors by runtime name (a file; none when it trains none)."""
        if r.held is not None and r.held.modules:
            from block_library.artifact import write_state

            write_state(subblock_tensors(r.held.modules, r.named), r.tensors)


def _modules(model: Any, named: dict[str, tuple[int, str]]) -> dict[str, nn.Module]:
    """The trained sub-blocks of ``model`` by key: each one's norm and body."""
    return {k: nn.ModuleDict({name: getattr(model.model.layers[l], name) for name in SUBBLOCKS[sub]})
            for k, (l, sub) in named.items()}
