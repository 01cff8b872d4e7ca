"""Build a runtime model from a config and a state dict without a wasted random init."""

from __future__ import annotations

from typing import Any

import torch

from puzzle.errors import CorruptArtifactError
from puzzle.model import PuzzleConfig, PuzzleForCausalLM


def _keys_of(model: PuzzleForCausalLM) -> set[str]:
    keys = set(model.state_dict().keys())
    if model.config.tie_word_embeddings:
        keys.discard("lm_head.weight")
    return keys


def model_from_state_dict(
    config: PuzzleConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype | None = torch.float32
) -> PuzzleForCausalLM:
    """Instantiate on the meta device and adopt the given tensors (cast to ``dtype``).

    Missing or unexpected names raise :class:`CorruptArtifactError` listing a few of them, and so
    does a tensor whose shape does not match the config.
    """
    with torch.device("meta"):
        model = PuzzleForCausalLM(config)
    want = _keys_of(model)
    missing, unexpected = sorted(want - state.keys()), sorted(state.keys() - want)
    if missing or unexpected:
        raise CorruptArtifactError(
            f"weights do not match the architecture: missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )
    params = dict(model.named_parameters())
    for name in sorted(want):
        if tuple(state[name].shape) != tuple(params[name].shape):
            raise CorruptArtifactError(
                f"{name}: checkpoint shape {tuple(state[name].shape)} != architecture shape {tuple(params[name].shape)}"
            )
    cast: dict[str, Any] = {k: (v.to(dtype) if dtype is not None else v) for k, v in state.items()}
    model.load_state_dict(cast, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
