"""Export to the DeciLM / nemotron-nas checkpoint format that vLLM, TensorRT-LLM and llama.cpp load.

The directory holds ``config.json`` (``model_type: nemotron-nas``, ``block_configs``), safetensors
weights under the DeciLM names (identical to the runtime's), the tokenizer files, and this
project's ``configuration_decilm.py`` / ``modeling_decilm.py`` with an ``auto_map``, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` runs it without puzzle.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from puzzle import __version__
from puzzle.errors import ExportError
from puzzle.export.remote.configuration_decilm import ffn_mult_to_intermediate_size
from puzzle.export.streaming import streamed_runtime_tensors
from puzzle.io import (atomic_directory, atomic_write_json, atomic_write_text, copy_tokenizer_files, save_safetensors,
                       save_safetensors_streamed)
from puzzle.loading import load_config, resolve_source
from puzzle.model import PuzzleConfig, PuzzleForCausalLM
from puzzle.schema import BlockConfig

log = logging.getLogger(__name__)

AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}
_MODELING_FOOTER = '''

# ---- appended by `puzzle export`: the DeciLM entry point of this checkpoint ----
from .configuration_decilm import DeciLMConfig  # noqa: E402


class DeciLMForCausalLM(HeterogeneousForCausalLM):
    config_class = DeciLMConfig
'''


def ffn_mult_for(intermediate_size: int, hidden_size: int) -> tuple[float, bool]:
    """``ffn_mult`` for a SwiGLU width, and whether engines turn it back into that exact width.

    The value is the exact ratio ``3 m / (2 h)`` rounded to 6 decimals, as NVIDIA's configs store
    it (Llama-3.1-8B's 14336 at hidden 4096 is 5.25). The engines' rule only produces multiples
    of 256, so any other width is not ``exact``.
    """
    mult = round(3 * intermediate_size / (2 * hidden_size), 6)
    return mult, ffn_mult_to_intermediate_size(mult, hidden_size) == intermediate_size


def block_to_decilm(block: BlockConfig, *, num_attention_heads: int, hidden_size: int) -> tuple[dict[str, Any], bool]:
    """One layer's DeciLM entry, and whether engines reproduce its FFN width exactly."""
    a, f = block.attention, block.ffn
    attention = {
        "n_heads_in_group": num_attention_heads // a.num_key_value_heads if a.kind == "gqa" else None,
        "no_op": a.kind == "no_op",
        "replace_with_linear": a.kind == "linear",
    }
    # As NVIDIA's block_config writes it: ffn_mult is null for no-op and linear FFNs.
    ffn: dict[str, Any] = {"ffn_mult": None, "no_op": f.kind == "no_op", "replace_with_linear": f.kind == "linear"}
    exact = True
    if f.kind == "swiglu":
        ffn["ffn_mult"], exact = ffn_mult_for(f.intermediate_size, hidden_size)
        if not exact:
            ffn["intermediate_size"] = f.intermediate_size
    return {"attention": attention, "ffn": ffn}, exact


def decilm_config_dict(config: PuzzleConfig, *, dtype: torch.dtype) -> tuple[dict[str, Any], list[int]]:
    """The exported ``config.json`` and the layers whose FFN width engines will not reproduce."""
    blocks, inexact = [], []
    for i, block in enumerate(config.blocks):
        entry, exact = block_to_decilm(block, num_attention_heads=config.num_attention_heads, hidden_size=config.hidden_size)
        blocks.append(entry)
        if not exact:
            inexact.append(i)
    out = {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": dict(AUTO_MAP),
        "block_configs": blocks,
        "num_hidden_layers": len(blocks),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "head_dim": config.head_dim,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": dict(config.rope_parameters),
        "rope_theta": config.rope_parameters["rope_theta"],
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "hidden_act": "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        "puzzle_version": __version__,
    }
    if config.qkv_bias is not None:
        out["qkv_bias"] = config.qkv_bias
    if config.rope_parameters.get("rope_type", "default") != "default":  # for readers of v4-era configs
        out["rope_scaling"] = {k: v for k, v in config.rope_parameters.items() if k != "rope_theta"}
    return out, inexact


def modeling_source() -> str:
    """``modeling_decilm.py``: the runtime's modeling file verbatim plus the DeciLM entry class."""
    return resources.files("puzzle.model").joinpath("modeling.py").read_text() + _MODELING_FOOTER


def configuration_source() -> str:
    return resources.files("puzzle.export").joinpath("remote/configuration_decilm.py").read_text()


def _check_destination(out_dir: Path, protected: list[Path]) -> None:
    out = out_dir.resolve()
    for p in protected:
        p = p.resolve()
        if out == p or p in out.parents or out in p.parents:
            raise ExportError(f"refusing to export into {out_dir}: it overlaps the source model directory {p}")


def export_decilm(
    model: PuzzleForCausalLM,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``model`` as a DeciLM checkpoint directory, atomically; return its path.

    ``source_dir``: the directory the model came from; its tokenizer files (and generation
    config) are copied, and it is protected: exporting into or over it raises :class:`ExportError`.
    ``dtype``: cast the weights (default: keep the model's dtype).
    """
    out_dir = Path(out_dir)
    check_output(out_dir, [Path(source_dir)] if source_dir is not None else [], overwrite=overwrite)
    config = model.config
    dtype = dtype or next(model.parameters()).dtype
    cfg = _config_json(config, dtype)
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_safetensors(state, tmp, max_shard_bytes=max_shard_bytes)
        _write_extras(tmp, cfg, source_dir)
    log.info("exported %d layers to %s", len(cfg["block_configs"]), out_dir)
    return out_dir


def check_output(out_dir: Path, protected: list[Path], *, overwrite: bool) -> None:
    """Never into or over a source directory; never over a non-empty one unless ``overwrite``; never under a
    file or where this process cannot write (checked before the source is read: nothing is written)."""
    from puzzle.io import check_writable

    out_dir = Path(out_dir)
    _check_destination(out_dir, protected)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file; name a directory for the export")
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} already exists and is not empty; pass overwrite=True (--force) to replace it")
    existing = next(p for p in (out_dir.resolve(), *out_dir.resolve().parents) if p.exists())
    if not existing.is_dir():
        raise ExportError(f"not a directory: {existing} is a file, so --out {out_dir} cannot be made: move "
                          f"{existing.name} away or choose another --out")
    check_writable("--out", out_dir, existing)


def _config_json(config: PuzzleConfig, dtype: torch.dtype) -> dict[str, Any]:
    cfg, inexact = decilm_config_dict(config, dtype=dtype)
    if inexact:
        log.warning(
            "layers %s have FFN widths that are not multiples of 256: no ffn_mult reproduces them under "
            "vLLM's rule, so vLLM/TensorRT-LLM will not load those layers' sizes; the exported "
            "intermediate_size keeps the checkpoint exact for transformers and puzzle", inexact,
        )
    return cfg


def _write_extras(tmp: Path, cfg: dict[str, Any], tokenizer_dir: str | Path | None) -> None:
    """Everything but the weights: config, the two remote-code files, the tokenizer files."""
    atomic_write_json(tmp / "config.json", cfg)
    atomic_write_text(tmp / "configuration_decilm.py", configuration_source())
    atomic_write_text(tmp / "modeling_decilm.py", modeling_source())
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, tmp)


def export_decilm_dir(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """:func:`export_decilm` of the model in ``model_dir`` (runtime, DeciLM or HF), streamed: the
    tensors are read, cast and written one at a time, never the whole model (peak memory: one tensor
    in flight, see :mod:`puzzle.export.memory`). The files equal those of ``export_decilm(
    load_model(model_dir, dtype=None), ...)`` byte for byte (same shards for the same ``max_shard_bytes``).

    ``dtype``: cast the weights (default: the stored dtype of the embedding, as ``load_model(...,
    dtype=None)`` would hold it). The tokenizer files come from ``source_dir`` when given, else from
    ``model_dir``; writing into or over either raises :class:`ExportError`.
    """
    src = resolve_source(model_dir)
    out_dir = Path(out_dir)
    check_output(out_dir, [src.directory] + ([Path(source_dir)] if source_dir is not None else []),
                  overwrite=overwrite)
    config = load_config(src)
    specs, read, stored = streamed_runtime_tensors(src, config, dtype=dtype)
    cfg = _config_json(config, dtype or stored)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_safetensors_streamed(specs, read, tmp, max_shard_bytes=max_shard_bytes)
        _write_extras(tmp, cfg, source_dir if source_dir is not None else src.directory)
    log.info("exported %d layers of %s to %s (streamed)", len(cfg["block_configs"]), src.directory, out_dir)
    return out_dir
