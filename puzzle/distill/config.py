"""``GKDConfig``: data, objective and schedule of global knowledge distillation.

    # puzzle distill runs/child --parent smollm2-135m --out runs/gkd --config gkd.yaml
    sources: [stdlib]
    seq_len: 256
    batch: 4
    steps: 32
    lr: 1.0e-4
    kl_weight: 1.0
    cosine_weight: 1.0
    hidden: final

Every key is optional; unknown keys are errors naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from block_library.schedule import TrainingSchedule
from puzzle.errors import ConfigError
from puzzle.io import config_from_yaml

HIDDEN = ("final", "all")
TRAIN = ("all", "decoder", "replaced")
"""What GKD trains (:mod:`puzzle.distill.trainable`): every weight, the decoder's, or the replaced sub-blocks'."""


@dataclass(frozen=True, kw_only=True)
class GKDConfig(TrainingSchedule):
    """How a child is distilled against its frozen parent (every child weight is trained unless ``train`` says).
    ``lr``, ``warmup_fraction``, ``min_lr_ratio`` and ``grad_clip`` are the schedule of
    :class:`~block_library.schedule.TrainingSchedule` (AdamW without weight decay)."""

    sources: tuple[str, ...] = ("stdlib",)
    """Corpus sources (``stdlib``, text files, directories, .jsonl, .parquet): the train split trains,
    the validation split evaluates."""
    seq_len: int = 256
    """Tokens per packed sequence."""
    batch: int = 4
    """Sequences per optimizer step (over all processes: under ``torchrun`` each of ``world`` processes takes
    ``batch / world`` of them, so batch must be a multiple of the number of processes)."""
    micro_batch: int = 0
    """Sequences per forward/backward pass of one process, gradients accumulated over its share of the
    batch (0: the whole share at once). Bounds activation memory (the logits are micro_batch x seq_len x
    vocab floats); the trained weights equal those of micro_batch 0 up to float rounding."""
    steps: int = 32
    """Optimizer steps; ``steps * batch`` training sequences are read once (cycled when the corpus is short)."""
    lr: float = 1e-4
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    """One norm over all the child's weights."""
    kl_weight: float = 1.0
    """Weight of KL(parent || child) of the next-token distributions, mean per token (nats)."""
    cosine_weight: float = 1.0
    """Weight of the mean cosine distance (1 - cos) between child and parent hidden states."""
    lm_weight: float = 0.0
    """Weight of the child's own next-token cross-entropy on the data."""
    hidden: str = "final"
    """Hidden states the cosine term compares: ``final`` (the last layer's output, before the final
    norm) or ``all`` (every pair of a layer map; identity when child and parent have equal depth)."""
    val_sequences: int = 8
    """Validation-split sequences on which KL, top-1 agreement, LM loss and cosine distance are measured."""
    val_every: int = 8
    """Steps between validations (0: only before and after training)."""
    checkpoint_every: int = 8
    """Steps between resumable checkpoints (0: none). Not part of the run's identity: changing it resumes."""
    seed: int = 0
    """Seed of the order in which training sequences are visited."""
    activation_checkpointing: bool = False
    """Keep only each decoder layer's input for the backward pass and recompute the layer then: activation
    memory drops from every layer's internals to one layer's, for about one more forward pass of compute.
    The trained weights are the same. Not part of the run's identity."""
    offload: bool = False
    """Under torchrun on GPUs: keep the student's fp32 shards, gradients and AdamW moments in host RAM
    (FSDP2's ``CPUOffloadPolicy``; the optimizer steps on the CPU), so a device holds only the layers being
    computed. For children whose training state does not fit the GPUs. Not part of the run's identity."""
    train: str = "all"
    """Which of the child's weights train (:mod:`puzzle.distill.trainable`): ``all``; ``decoder`` (the embedding and
    LM head frozen); ``replaced`` (only the sub-blocks that differ from the parent's, each with its norm: the
    parent's own sub-blocks, the final norm and the embedding frozen). A frozen weight keeps no gradient and no
    AdamW moments, so a rank holds 4 bytes of it instead of 16: the memory plan's fallbacks when the whole student
    does not fit. Part of the run's identity unless ``all``."""

    def __post_init__(self) -> None:
        sources = (self.sources,) if isinstance(self.sources, str) else tuple(self.sources or ())
        if not sources or not all(isinstance(s, str) and s for s in sources):
            raise ConfigError(f"sources must be a non-empty list of paths or 'stdlib', got {self.sources!r}")
        object.__setattr__(self, "sources", sources)
        for name, lo in (("seq_len", 2), ("batch", 1), ("micro_batch", 0), ("steps", 1), ("val_sequences", 1),
                         ("val_every", 0), ("checkpoint_every", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name, lo, hi, open_lo in (("lr", 0.0, None, True), ("warmup_fraction", 0.0, 1.0, False),
                                      ("min_lr_ratio", 0.0, 1.0, False), ("grad_clip", 0.0, None, False),
                                      ("kl_weight", 0.0, None, False), ("cosine_weight", 0.0, None, False),
                                      ("lm_weight", 0.0, None, False)):
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (v > lo if open_lo else v >= lo)
            if not ok or (hi is not None and v > hi):
                bound = f"> {lo}" if open_lo else f">= {lo}"
                upper = f" and <= {hi}" if hi is not None else ""
                raise ConfigError(f"{name} must be a number {bound}{upper}, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.kl_weight + self.cosine_weight + self.lm_weight == 0:
            raise ConfigError("kl_weight, cosine_weight and lm_weight are all 0: nothing to train on")
        if not isinstance(self.offload, bool):
            raise ConfigError(f"offload must be true or false, got {self.offload!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ConfigError(f"activation_checkpointing must be true or false, got {self.activation_checkpointing!r}")
        if self.hidden not in HIDDEN:
            raise ConfigError(f"hidden must be one of {HIDDEN}, got {self.hidden!r}")
        if self.train not in TRAIN:
            raise ConfigError(f"train must be one of {TRAIN}, got {self.train!r}")

    @property
    def train_sequences(self) -> int:
        return self.steps * self.batch

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> GKDConfig:
        data = data or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"a GKD config must be a mapping, got {type(data).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(f"GKD config: unknown key(s) {unknown}; allowed keys are {allowed}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> GKDConfig:
        return config_from_yaml(path, cls.from_dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sources"] = list(self.sources)
        return out

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trained weights and the curve (what a resume must match)."""
        out = self.to_dict()
        for how in ("checkpoint_every", "activation_checkpointing", "offload"):  # how it runs, not what it computes
            out.pop(how)
        if self.train == "all":  # the runs from before the field keep their identity
            out.pop("train")
        return out
