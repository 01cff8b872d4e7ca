"""Build a runtime model from a config and tensors without a wasted random init.

    model_from_state_dict(config, state)   every weight given: a complete model
    meta_model(config)                     every weight on the meta device (0 bytes), to fill in part
    adopt(model, state)                    put some weights into a (meta) model, checking their shapes
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from puzzle.errors import CorruptArtifactError
from puzzle.model import PuzzleConfig, PuzzleForCausalLM


def meta_model(config: PuzzleConfig) -> PuzzleForCausalLM:
    """The runtime model with every parameter on the meta device (the RoPE table is real: it is
    computed on the CPU explicitly), tied head included, in eval mode."""
    with torch.device("meta"):
        model = PuzzleForCausalLM(config)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def runtime_weight_names(model: PuzzleForCausalLM) -> list[str]:
    """The names a checkpoint of ``model`` stores (a tied ``lm_head.weight`` is not one of them)."""
    names = list(model.state_dict().keys())
    if model.config.tie_word_embeddings:
        names.remove("lm_head.weight")
    return names


def part_weight_names(model: PuzzleForCausalLM, layers: Sequence[int], *, embed: bool, head: bool) -> list[str]:
    """The stored names of a model's part: the decoder ``layers``, the embedding when ``embed``, the final norm and
    LM head when ``head`` (a tied head is the embedding, named then too)."""
    prefixes = tuple(f"model.layers.{l}." for l in layers)
    extra = {"model.embed_tokens.weight"} if embed or (head and model.config.tie_word_embeddings) else set()
    extra |= {"model.norm.weight", "lm_head.weight"} if head else set()
    return [k for k in runtime_weight_names(model) if k.startswith(prefixes) or k in extra]


def adopt(model: PuzzleForCausalLM, state: dict[str, torch.Tensor], *, dtype: torch.dtype | None = torch.float32) -> None:
    """Make the tensors in ``state`` (runtime names, cast to ``dtype``) the model's own, in place.

    A name the model lacks, or a tensor whose shape does not match the config, raises
    :class:`CorruptArtifactError`. Parameters not in ``state`` are left as they are (on meta, say).
    A tied head follows the embedding.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(state.keys() - params.keys())
    if unknown:
        raise CorruptArtifactError(f"weights do not match the architecture: unexpected {unknown[:6]}"
                                   f"{'...' if len(unknown) > 6 else ''}")
    for name in sorted(state):
        if tuple(state[name].shape) != tuple(params[name].shape):
            raise CorruptArtifactError(
                f"{name}: checkpoint shape {tuple(state[name].shape)} != architecture shape {tuple(params[name].shape)}"
            )
    cast = {k: (v.to(dtype) if dtype is not None else v) for k, v in state.items()}
    model.load_state_dict(cast, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def model_from_state_dict(
    config: PuzzleConfig, state: dict[str, torch.Tensor], *, dtype: torch.dtype | None = torch.float32
) -> PuzzleForCausalLM:
    """Instantiate on the meta device and adopt the given tensors (cast to ``dtype``).

    Missing or unexpected names raise :class:`CorruptArtifactError` listing a few of them, and so
    does a tensor whose shape does not match the config.
    """
    model = meta_model(config)
    want = set(runtime_weight_names(model))
    missing, unexpected = sorted(want - state.keys()), sorted(state.keys() - want)
    if missing or unexpected:
        raise CorruptArtifactError(
            f"weights do not match the architecture: missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )
    adopt(model, state, dtype=dtype)
    return model
