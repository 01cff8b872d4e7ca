"""One entry point for every model source: embedded name, HF parent dir, runtime dir, DeciLM export.

    resolve_source("smollm2-135m")  -> Source(kind="embedded", directory=<cache dir>)
    load_config(source)             -> PuzzleConfig (no weights read)
    load_model(source)              -> PuzzleForCausalLM
    load_layers(source, [3, 4])     -> PuzzleForCausalLM with layers 3 and 4 read, the rest on meta
    load_tokenizer(source)          -> a transformers tokenizer

Nothing here executes code from a checkpoint directory: DeciLM configs are parsed by this project's own
``configuration_decilm`` module. A hub id is read through huggingface_hub's cache (:mod:`puzzle.parents.hub`:
config, safetensors and tokenizer files only).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from puzzle.config_json import check_config_json
from puzzle.errors import CorruptArtifactError, ModelFilesError, UnknownModelError
from puzzle.io import load_safetensors, read_json_file, safetensors_files
from puzzle.model import PuzzleConfig, PuzzleForCausalLM
from puzzle.model.weights import adopt, meta_model, model_from_state_dict, part_weight_names, runtime_weight_names
from puzzle.parents import embedded, hub
from puzzle.parents.hf import (WeightSource, hf_state_dict_to_runtime, hf_weight_source, puzzle_config_from_hf,
                               read_config_json)
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

log = logging.getLogger(__name__)

# transformers' generic config fields, meaningless for a decoder LM: kept out of runtime config.json files.
_GENERIC_CONFIG_KEYS = {"transformers_version", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
                        "is_encoder_decoder", "output_hidden_states", "output_attentions", "return_dict", "_name_or_path"}


@dataclass(frozen=True)
class Source:
    """Where a model lives and how to read it."""

    name: str
    """What the user typed."""
    kind: str
    """``embedded`` (cached embedded parent), ``hf`` (Llama/Mistral/Qwen2 dir), ``runtime`` or ``decilm``."""
    directory: Path
    """The directory holding config.json, weights and tokenizer files."""


def resolve_source(source: str | Path | Source, *, config_only: bool = False) -> Source:
    """Classify a model name, directory or hub id; raise a clear error when it is none of them. A hub id is read
    from huggingface_hub's cache, downloaded there first when missing (``config_only``: its config.json alone)."""
    if isinstance(source, Source):
        return source
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        cfg = read_config_json(path)
        return Source(name=text, kind=_kind_of(cfg), directory=path)
    if path.exists():
        raise ModelFilesError(f"{text} is a file; pass a model directory (with config.json) or an embedded name")
    if embedded.canonical_name(text) is not None:
        return Source(name=text, kind="embedded", directory=embedded.resolve_embedded(text))
    if hub.is_hub_id(text):
        snap = hub.snapshot(text, config_only=config_only)
        return Source(name=text, kind=_kind_of(read_config_json(snap.directory)), directory=snap.directory)
    known = ", ".join(sorted(embedded.EMBEDDED))
    raise UnknownModelError(f"unknown model {text!r}: not an existing directory, an embedded model ({known}) or a hub "
                            "id (org/name[@revision])")


def _kind_of(cfg: dict[str, Any]) -> str:
    if cfg.get("model_type") == PuzzleConfig.model_type:
        return "runtime"
    if cfg.get("model_type") == "nemotron-nas" or "DeciLMForCausalLM" in (cfg.get("architectures") or []):
        return "decilm"
    return "hf"


def _config_from_decilm(cfg: dict[str, Any]) -> PuzzleConfig:
    from puzzle.export.remote.configuration_decilm import DeciLMConfig

    kwargs = {k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "model_type", "transformers_version", "puzzle_version")}
    deci = DeciLMConfig(**kwargs)
    blocks = []
    for spec in deci.resolved_blocks():
        attention = AttentionConfig(kind=spec["attention"], num_key_value_heads=spec["num_key_value_heads"])
        ffn = FFNConfig(kind=spec["ffn"], intermediate_size=spec["intermediate_size"])
        blocks.append(BlockConfig(attention=attention, ffn=ffn))
    swiglu = [b.ffn.intermediate_size for b in blocks if b.ffn.kind == "swiglu"]
    return PuzzleConfig(
        vocab_size=deci.vocab_size,
        hidden_size=deci.hidden_size,
        num_attention_heads=deci.num_attention_heads,
        head_dim=deci.head_dim,
        num_key_value_heads=deci.num_key_value_heads,
        intermediate_size=deci.intermediate_size or (max(swiglu) if swiglu else 4 * deci.hidden_size),
        block_configs=[b.to_dict() for b in blocks],
        rms_norm_eps=deci.rms_norm_eps,
        max_position_embeddings=deci.max_position_embeddings,
        rope_parameters=deci.rope_parameters,
        tie_word_embeddings=deci.tie_word_embeddings,
        attention_bias=deci.attention_bias,
        qkv_bias=deci.qkv_bias,
        mlp_bias=deci.mlp_bias,
        bos_token_id=deci.bos_token_id,
        eos_token_id=deci.eos_token_id,
        pad_token_id=deci.pad_token_id,
        parent_architecture="DeciLMForCausalLM",
    )


def load_config(source: str | Path | Source) -> PuzzleConfig:
    """The runtime config of any source, without reading weights."""
    src = resolve_source(source)
    cfg = read_config_json(src.directory)
    where = str(src.directory / "config.json")
    check_config_json(cfg, where=where, kind=src.kind)  # every field read below: present and of its type
    if src.kind == "runtime":
        cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version", "architectures")}
        return PuzzleConfig(**cfg)
    if src.kind == "decilm":
        return _config_from_decilm(cfg)
    return puzzle_config_from_hf(cfg, where=where)


def load_model(source: str | Path | Source, *, dtype: torch.dtype | None = torch.float32) -> PuzzleForCausalLM:
    """Load any source into the runtime (eval mode, CPU, ``dtype``; None keeps the stored dtype)."""
    src = resolve_source(source)
    config = load_config(src)
    state = load_safetensors(src.directory)
    if src.kind in ("hf", "embedded"):
        state = hf_state_dict_to_runtime(state, config)
    model = model_from_state_dict(config, state, dtype=dtype)
    model.name_or_path = str(src.directory)
    return model


def weight_source(src: Source, name: str, config: PuzzleConfig) -> WeightSource:
    """The stored tensor(s) behind the runtime tensor ``name``: HF parents go through the HF map
    (the one :func:`load_model` uses); runtime and DeciLM directories store runtime names."""
    if src.kind in ("hf", "embedded"):
        return hf_weight_source(name, config)
    return WeightSource((name,))


def tensor_files(directory: str | Path) -> dict[str, Path]:
    """Which safetensors file holds each stored tensor: from the shard index, else from each file's header."""
    import safetensors

    directory = Path(directory)
    files = safetensors_files(directory)  # checks that the index's files exist; refuses pickles
    index = read_json_file(directory / "model.safetensors.index.json")
    if index is not None:
        return {name: directory / file for name, file in index["weight_map"].items()}
    where: dict[str, Path] = {}
    for f in files:
        try:
            with safetensors.safe_open(str(f), framework="pt") as handle:
                names = list(handle.keys())
        except (safetensors.SafetensorError, OSError) as e:
            raise CorruptArtifactError(f"cannot read {f}: {e} (truncated or not a safetensors file?)") from None
        repeated = sorted(where.keys() & set(names))
        if repeated:
            raise CorruptArtifactError(f"{f} repeats tensors already read: {repeated[:5]}")
        where.update(dict.fromkeys(names, f))
    return where


def read_tensor(path: Path, name: str, *, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """One stored tensor as a CPU tensor of its own (``dtype``; None keeps the stored one).

    The file is memory-mapped only while this tensor is copied out, so only its pages are ever read.
    """
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            t = handle.get_tensor(name)  # a view of the mapped file
            return t.to(dtype or t.dtype, copy=True)  # its own memory: closing unmaps the file
    except (safetensors.SafetensorError, OSError) as e:
        raise CorruptArtifactError(f"cannot read {name} from {path}: {e} (truncated or not a safetensors file?)") from None


def load_layers(source: str | Path | Source, layers: Sequence[int], *, embed: bool = False, head: bool = False,
                dtype: torch.dtype | None = torch.float32) -> PuzzleForCausalLM:
    """The runtime model with only some parts read from disk, one tensor at a time; the rest on meta.

    Reads the decoder ``layers``, the token embedding when ``embed``, and the final norm and LM
    head when ``head`` (a tied head is the embedding, read then too). Every other parameter stays
    on the meta device (0 bytes); the RoPE table is real. Peak memory is the tensors read plus
    one in flight. Sharded checkpoints are read through their index. Eval mode, ``dtype``.
    """
    src = resolve_source(source)
    config = load_config(src)
    n = config.num_hidden_layers
    outside = sorted({l for l in layers if not 0 <= l < n})
    if outside:
        raise ValueError(f"layers {outside} are outside 0..{n - 1} of {src.directory}")
    model = meta_model(config)
    wanted = part_weight_names(model, layers, embed=embed, head=head)
    where = tensor_files(src.directory)
    state = {}
    for name in wanted:
        ws = weight_source(src, name, config)
        absent = [k for k in ws.names if k not in where]
        if absent:
            raise CorruptArtifactError(f"{src.directory}: the checkpoint has no {absent[0]} (for {name})")
        state[name] = ws.read(lambda k: read_tensor(where[k], k, dtype=dtype))
    adopt(model, state, dtype=dtype)
    model.name_or_path = str(src.directory)
    log.info("read %d tensors (layers %s%s%s) of %s", len(state), list(layers), ", embedding" if embed else "",
             ", head" if head else "", src.directory)
    return model


def stored_tensors(source: str | Path | Source, *, dtype: torch.dtype | None = torch.float32) -> dict[str, Any]:
    """Every runtime tensor of a stored model, read from disk only when asked for: a mapping of
    runtime name -> a function returning that tensor (one read each; nothing is kept)."""
    src = resolve_source(source)
    config = load_config(src)
    where = tensor_files(src.directory)

    def reader(name: str) -> Any:
        ws = weight_source(src, name, config)
        return lambda: ws.read(lambda k: read_tensor(where[k], k, dtype=dtype))

    return {name: reader(name) for name in runtime_weight_names(meta_model(config))}


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def load_tokenizer(source: str | Path | Source) -> Any:
    """The tokenizer stored with a model (local files only). Shared between callers while its files are
    unchanged (a load takes about 0.6 s; a search asked six times): use it, do not modify it."""
    src = resolve_source(source)
    if not any((src.directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelFilesError(f"{src.directory} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    files = tuple((f, st.st_size, st.st_mtime_ns) for f in _TOKENIZER_FILES
                  if (st := _stat(src.directory / f)) is not None)
    return _cached_tokenizer(str(src.directory.resolve()), files)


def _stat(path: Path) -> Any:
    try:
        return path.stat()
    except OSError:
        return None


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(directory: str, files: tuple[tuple[str, int, int], ...]) -> Any:
    """``files`` (name, size, mtime) is part of the key: rewritten tokenizer files load anew."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)


def runtime_config_dict(config: PuzzleConfig) -> dict[str, Any]:
    """The ``config.json`` of a runtime directory (``model_type: puzzle``)."""
    data = {k: v for k, v in config.to_dict().items() if k not in _GENERIC_CONFIG_KEYS}
    data["architectures"] = ["PuzzleForCausalLM"]
    return data


def save_runtime(model: PuzzleForCausalLM, out_dir: str | Path, *, source: Source | None = None, overwrite: bool = False) -> Path:
    """Save a runtime model (``model_type: puzzle``) with the source's tokenizer files, atomically."""
    from puzzle.io import atomic_directory, atomic_write_json, copy_tokenizer_files, save_safetensors

    config = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_safetensors(state, tmp)
        atomic_write_json(tmp / "config.json", runtime_config_dict(config))
        if source is not None:
            copy_tokenizer_files(source.directory, tmp)
    return Path(out_dir)
