"""Child-aware BLD: the child's chosen sub-blocks retrained on the child's own activations, before GKD.

Library BLD (:mod:`block_library.bld`) trains every variant of every layer on the *parent's*
activations, a few steps each, because it trains hundreds of them. Once the MIP has chosen, the child
holds only a few dozen replaced sub-blocks, and they see the *child's* stream, which drifts from the
parent's layer after layer. Here each replaced sub-block learns to compute what the parent's own
sub-block computes on the input the child actually gives it:

    x  = the child's stream entering layer l           (B, T, H), no gradient into earlier layers
    h  = x + attn_child(norm(x))     target  x + attn_parent(norm(x))     NMSE trains attn_child
    y  = h + ffn_child(norm(h))      target  h + ffn_parent(norm(h))      on h detached: trains ffn_child

Sub-blocks equal to the parent's and no-ops are left as they are. Each sub-block has its own gradient
clip and the losses are local, so one layer's backward frees its activations before the next layer
runs (memory: the child, the parent, AdamW state of the trained sub-blocks and one layer's activations).
Every step reads the child's stream once and the parent's sub-blocks once on it; no parent pass of its
own is needed.

Measured on SmolLM2-135M (``benchmarks/quality.py``'s held-out text, the quick library's MIP child at 62.5%
of the decoder FLOPs, 16,384 tokens): at 8 sequences a step and lr 1e-3, KL 1.256 -> 0.926; the same tokens
with the parent's stream as input (more library BLD on the chosen blocks) gave 0.953, and the parent's own
next state as the target (drift correction) 1.006. At 4 sequences a step and lr 2e-3 (the defaults) 0.859,
and at 81% 0.438 -> 0.314 (1e-3 / 8: 0.359; 3e-3 / 4: 0.307; 2e-3 / 2: 0.298, 20% slower).

Parent and child are whole here; :mod:`puzzle.distill.child_bld_sharded` splits their layers over the ``torchrun``
ranks, and each rank's into rounds that fit its memory (the same weights; one process too).

Resumable: with ``directory``, the trained sub-blocks and their AdamW state are checkpointed every
``checkpoint_every`` steps and after the last (:mod:`block_library.checkpoint`, safetensors); a rerun
continues there, and a finished one reloads its weights without training.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from block_library.schedule import TrainingSchedule
from puzzle.distill.child_refit import refit_child_ffns
from puzzle.distill.subblocks import SUBBLOCKS, replaced_subblocks, through
from puzzle.errors import ConfigError, NumericalError


@dataclass(frozen=True)
class ChildBLDConfig(TrainingSchedule):
    """Child-aware BLD's settings. ``lr``, ``warmup_fraction``, ``min_lr_ratio`` and ``grad_clip`` are the schedule of
    :class:`~block_library.schedule.TrainingSchedule`."""

    tokens: int
    """Training tokens: ``tokens // seq_len`` sequences (at least one), ``batch`` a step."""
    batch: int = 4
    seq_len: int = 256
    lr: float = 2e-3
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    """Per sub-block, as in library BLD."""
    checkpoint_every: int = 4
    seed: int = 0
    """Seed of the order in which the training sequences are visited (0: the split's own order)."""
    refit: bool = False
    """First refit the pruned FFNs' down projections by least squares on the child's stream, on the same tokens
    (:mod:`puzzle.distill.child_refit`), then take the gradient steps."""
    refit_drift: float = 0.75
    """The refit's blend of the parent's own next stream into its target (0: the parent's FFN on the child's input)."""
    refit_ridge: float = 0.1
    refit_select: bool = True
    """The refit chooses the pruned FFNs' kept channels again on the child's stream (OBS elimination from the
    parent's FFN), not only their down projections."""

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.batch < 1 or self.seq_len < 2 or not self.lr > 0 or self.seed < 0:
            raise ConfigError(f"child-aware BLD needs tokens >= 1, batch >= 1, seq_len >= 2, lr > 0 and seed >= 0, "
                              f"got {self}")
        if (not isinstance(self.refit, bool) or not isinstance(self.refit_select, bool)
                or not 0.0 <= self.refit_drift <= 1.0 or not self.refit_ridge > 0):
            raise ConfigError(f"child-aware BLD's refit needs refit and refit_select bools, refit_drift in [0, 1] and "
                              f"refit_ridge > 0, got {self.refit!r}, {self.refit_select!r}, {self.refit_drift} and "
                              f"{self.refit_ridge}")

    @property
    def step_batch(self) -> int:
        """Sequences per step: ``batch``, or all of them when ``tokens`` fill fewer."""
        return min(self.batch, max(1, self.tokens // self.seq_len))

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.seq_len) // self.step_batch


@dataclass
class ChildBLDResult:
    model: Any
    """The child, trained in place."""
    trained: list[str]
    """The sub-blocks trained, ``L007.ffn`` ..."""
    steps: int
    tokens: int
    seconds: float
    first_nmse: dict[str, float] = field(default_factory=dict)
    """Each trained sub-block's mean training NMSE over the first quarter of the steps (at least the first,
    before any update), and over the last quarter."""
    last_nmse: dict[str, float] = field(default_factory=dict)
    refit: dict[str, Any] = field(default_factory=dict)
    """The child-stream refit's summary (:class:`~puzzle.distill.child_refit.RefitResult`), when it ran."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        mean = lambda d: sum(d.values()) / len(d) if d else float("nan")  # noqa: E731
        return {"trained": len(self.trained), "steps": self.steps, "tokens": self.tokens,
                "seconds": round(self.seconds, 1), "tokens_per_s": round(self.tokens_per_s, 1),
                "first_nmse": mean(self.first_nmse), "last_nmse": mean(self.last_nmse), **self.refit}


def training_ids(sources: Sequence[str], tokenizer: Any, config: ChildBLDConfig, *, skip: int) -> torch.Tensor:
    """The training sequences of ``config``: ``(steps * step_batch, seq_len)`` ids of the train split after its
    first ``skip`` (a search passes the library's calibration and BLD sequences), in the order of ``config.seed``."""
    from puzzle.data import load_sequences
    from puzzle.errors import DataError

    need = config.steps * config.step_batch
    ids = load_sequences(list(sources), tokenizer, seq_len=config.seq_len, num_sequences=skip + need)
    if ids.shape[0] < skip + need:
        raise DataError(f"child-aware BLD needs {need} training sequences of {config.seq_len} tokens after the first "
                        f"{skip}; {list(sources)} has {ids.shape[0]}: add data or lower --child-bld-tokens")
    ids = ids[skip:]  # (need, seq_len)
    if config.seed:
        ids = ids[torch.randperm(need, generator=torch.Generator().manual_seed(config.seed))]
    return ids


def train_child_blocks(child: Any, parent: Any, ids: torch.Tensor, config: ChildBLDConfig, *,
                       directory: str | Path | None = None, progress: bool = False,
                       on_step: Callable[[int], None] | None = None) -> ChildBLDResult:
    """Train ``child``'s replaced sub-blocks in place on ``ids`` (N, seq_len) against ``parent``'s sub-blocks.

    ``directory``: where checkpoints and ``losses.csv`` go (None: neither). ``on_step(step)`` runs after each
    step (tests interrupt there)."""
    from block_library import checkpoint

    n_rows = config.steps * config.step_batch
    if ids.dim() != 2 or ids.shape[0] < n_rows or ids.shape[1] != config.seq_len:
        raise ConfigError(f"child-aware BLD needs ({n_rows}, {config.seq_len}) token ids, got {tuple(ids.shape)}")
    parts = replaced_subblocks(child, parent)
    refit: dict[str, Any] = {}
    if config.refit and parts:  # deterministic: a resumed run refits to the same weights, so its fingerprint holds
        refit = refit_child_ffns(child, parent, ids[:n_rows], ridge=config.refit_ridge, drift=config.refit_drift,
                                 select=config.refit_select, batch=config.batch, progress=progress).summary()
    keys = [f"L{l:03d}.{sub}" for l, sub in parts]
    modules = {k: nn.ModuleDict({name: getattr(child.model.layers[l], name) for name in SUBBLOCKS[sub]})
               for k, (l, sub) in zip(keys, parts)}
    named = dict(zip(keys, parts))
    child.requires_grad_(False)
    for m in modules.values():
        m.requires_grad_(True)
    parent.requires_grad_(False).eval()
    groups = [{"params": list(m.parameters())} for m in modules.values()]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0) if groups else None
    root = Path(directory) / "ckpt" if directory is not None else None
    tag = _fingerprint(config, keys, modules, ids[:n_rows])  # a checkpoint of other weights or tokens is not resumed
    rows: list[dict[str, Any]] = []
    start = checkpoint.latest_step(root, tag) if root is not None and optimizer is not None else 0
    if start:
        rows = checkpoint.load_layer(root, start, 0, modules, optimizer).get("losses", [])
    t0 = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start, desc="child BLD", unit="step", disable=not progress)
    child.train()
    try:
        for step in range(start, config.steps if optimizer is not None else 0):
            lr = config.lr_at(step, config.steps)
            losses = _step(child, parent, ids[step * config.step_batch:(step + 1) * config.step_batch], named)
            for m in modules.values():  # one norm per sub-block
                config.clip(m.parameters())
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rows += [{"step": step, "subblock": k, "train_nmse": v, "lr": lr} for k, v in losses.items()]
            bar.update(1)
            bar.set_postfix(nmse=f"{sum(losses.values()) / max(1, len(losses)):.4f}")
            # every checkpoint_every steps, and the last: a finished run that is rerun (its caller killed before
            # it saved the child) loads its weights instead of training again
            if root is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
                checkpoint.save_layer(root, step + 1, 0, modules, optimizer, {"losses": rows})
                checkpoint.commit(root, step + 1, tag)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        child.eval()
        child.requires_grad_(False)
    seconds = time.perf_counter() - t0
    if directory is not None:
        import pandas as pd

        from puzzle.io import atomic_write_text

        atomic_write_text(Path(directory) / "losses.csv",
                          pd.DataFrame(rows, columns=["step", "subblock", "train_nmse", "lr"]).to_csv(index=False))
    q = max(1, config.steps // 4)  # one batch is noisy: the means over the first and the last quarter of the steps
    first, last = mean_nmse(rows, range(q)), mean_nmse(rows, range(config.steps - q, config.steps))
    done = config.steps - start if optimizer is not None else 0
    return ChildBLDResult(model=child, trained=keys, steps=config.steps if keys else 0,
                          tokens=done * config.step_batch * config.seq_len, seconds=seconds, first_nmse=first,
                          last_nmse=last, refit=refit)


def mean_nmse(rows: list[dict[str, Any]], steps: range) -> dict[str, float]:
    """Each sub-block's mean training NMSE over ``steps``."""
    sums: dict[str, list[float]] = {}
    for r in rows:
        if r["step"] in steps:
            sums.setdefault(r["subblock"], []).append(r["train_nmse"])
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _fingerprint(config: ChildBLDConfig, keys: list[str], modules: dict[str, nn.Module], ids: torch.Tensor) -> str:
    """What a run starts from: the settings, the trained sub-blocks' initial weights and the tokens."""
    h = fingerprint_start(config, keys)
    fingerprint_modules(h, keys, modules)
    h.update(ids.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fingerprint_start(config: ChildBLDConfig, keys: list[str]) -> Any:
    """:func:`_fingerprint` in parts (a rank that trains its layers in rounds hashes one round's weights at a time):
    the settings and keys, then :func:`fingerprint_modules` for the keys in order, then the ids' bytes."""
    settings = asdict(config)
    if not config.refit:  # as before the refit existed: those checkpoints still resume
        for name in ("refit", "refit_drift", "refit_ridge", "refit_select"):
            settings.pop(name)
    return hashlib.sha256(json.dumps([settings, keys]).encode())


def fingerprint_modules(h: Any, keys: Sequence[str], modules: dict[str, nn.Module]) -> None:
    for key in keys:
        for name, t in modules[key].state_dict().items():
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())


def _step(child: Any, parent: Any, ids: torch.Tensor, parts: dict[str, tuple[int, str]]) -> dict[str, float]:
    """One batch through the child, layer by layer, each replaced sub-block's NMSE backpropagated locally."""
    body = child.model
    device = next(body.parameters()).device
    ids = ids.to(device)
    with torch.no_grad():
        x = body.embed_tokens(ids)  # (B, T, H)
    last = max(l for l, _ in parts.values())  # the layers after the last trained one change nothing
    return step_layers(child, parent, range(last + 1), x, step_context(body, *ids.shape, device), parts)[0]


def step_context(body: Any, B: int, T: int, device: torch.device) -> dict[str, Any]:
    """The rotary tables of a (B, T) batch, (B, T, hd) each in the stream's dtype, as a training step uses them."""
    pos = torch.arange(T, device=device)[None].expand(B, T)
    cos, sin = body.rotary_emb(pos, body.embed_tokens.weight.dtype)
    return {"cos": cos, "sin": sin, "mask": None, "cache": None}


def step_layers(child: Any, parent: Any, layers: range, x: torch.Tensor, ctx: dict[str, Any],
                parts: dict[str, tuple[int, str]]) -> tuple[dict[str, float], torch.Tensor]:
    """One batch's stream ``x`` (B, T, H) entering ``layers`` through them: every replaced sub-block among ``parts``
    (key -> (layer, sub-block)) there learns the parent's sub-block on its input, its NMSE backpropagated locally
    (gradients accumulate in its parameters). Returns the losses by key and the stream leaving the last layer,
    detached. One process runs every layer; a layer-sharded rank its own (:mod:`puzzle.distill.child_bld_sharded`)."""
    body, teacher = child.model, parent.model
    trained = {part: key for key, part in parts.items()}
    losses: dict[str, float] = {}
    for l in layers:
        mine, theirs = body.layers[l], teacher.layers[l]
        for sub in SUBBLOCKS:
            if mine.spec[sub] == "no_op":
                continue
            x = x.detach()
            if (l, sub) not in trained:
                with torch.no_grad():
                    x = through(mine, sub, x, ctx)
                continue
            with torch.no_grad():  # the parent's sub-block on the child's input
                target = through(theirs, sub, x, ctx)
            out = through(mine, sub, x, ctx)
            loss = (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)
            if not torch.isfinite(loss):
                raise NumericalError(f"child-aware BLD: the loss of layer {l}'s {sub} is {loss.item()}; "
                                     "lower the learning rate")
            loss.backward()
            losses[trained[(l, sub)]] = loss.item()
            x = out
    return losses, x.detach()
