"""The library directory: per-variant weights, an index table, and assembling a child from them.

    lib/
      manifest.json          stage, status (initialized | trained), parent, config and its hash
      config.yaml            the LibraryConfig used (space, bld, data)
      parent_config.json     the parent's runtime config
      shared.safetensors     token embedding, final norm (and an untied LM head)
      init/L007.ffn.swiglu-1024.safetensors     every variant as initialized from the parent
      trained/L007.ffn.swiglu-1024.safetensors  every trained variant after BLD
      index.csv              one row per (layer, sub-block, variant), see INDEX_COLUMNS
      bld/losses.csv         per-step training NMSE of every trained variant
      bld/validation.csv     validation NMSE per variant at every evaluation
      tokenizer files

A variant file holds the module state dict of :func:`block_library.variant.build_module` (names
like ``self_attn.k_proj.weight``), i.e. the runtime's names under ``model.layers.{i}.``.
No-op variants have no file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from block_library.config import LibraryConfig
from puzzle.errors import CorruptArtifactError, ModelFilesError, SchemaError
from puzzle.model import PuzzleConfig, PuzzleForCausalLM
from puzzle.schema import BlockConfig

MANIFEST = "manifest.json"
INDEX = "index.csv"
INDEX_COLUMNS = ["layer", "subblock", "variant", "kind", "is_parent", "trained", "params",
                 "init_val_nmse", "final_val_nmse", "file"]
STAGE = "library"


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ModelFilesError(f"{directory} is not a block library (no {MANIFEST}); build one with `puzzle library build`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path} is not valid JSON: {e}") from None
    if data.get("stage") != STAGE:
        raise CorruptArtifactError(f"{path}: stage is {data.get('stage')!r}, expected {STAGE!r}")
    return data


def is_library(directory: str | Path) -> bool:
    p = Path(directory) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("stage") == STAGE
    except (json.JSONDecodeError, OSError):
        return False


def read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CorruptArtifactError(f"missing variant file {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CorruptArtifactError(f"cannot read {path}: {e} (truncated?)") from None


def _runtime_config_json(config: PuzzleConfig) -> dict[str, Any]:
    """The config.json that :func:`puzzle.loading.save_runtime` writes for ``config``."""
    from puzzle.loading import runtime_config_dict

    return runtime_config_dict(config)


def _tensor_names(path: Path) -> list[str]:
    from puzzle.io import safetensors_header

    if not path.is_file():
        raise CorruptArtifactError(f"missing variant file {path}")
    return [k for k in safetensors_header(path) if k != "__metadata__"]


def write_state(state: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file in the same directory, then rename)."""
    import os
    import tempfile

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata=metadata or {"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Library:
    """A built (and possibly trained) block library on disk."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.config = LibraryConfig.from_dict(self.manifest["config"])
        index = self.directory / INDEX
        if not index.is_file():
            raise CorruptArtifactError(f"{self.directory} has no {INDEX}: the build was interrupted; rebuild it")
        self.table = pd.read_csv(index, keep_default_na=False, na_values={"init_val_nmse": [""], "final_val_nmse": [""]})
        missing = [c for c in INDEX_COLUMNS if c not in self.table.columns]
        if missing:
            raise CorruptArtifactError(f"{index} lacks columns {missing}")

    @property
    def status(self) -> str:
        return self.manifest["status"]

    @property
    def parent_config(self) -> PuzzleConfig:
        data = json.loads((self.directory / "parent_config.json").read_text())
        return PuzzleConfig(**data)

    def labels(self, layer: int, subblock: str) -> list[str]:
        t = self.table
        return list(t[(t.layer == layer) & (t.subblock == subblock)]["variant"])

    def variant_file(self, layer: int, subblock: str, label: str, *, initial: bool = False) -> Path | None:
        """The file of one variant (None for a no-op); ``initial``: before BLD."""
        t = self.table
        row = t[(t.layer == layer) & (t.subblock == subblock) & (t.variant == label)]
        if row.empty:
            raise SchemaError(f"layer {layer}: the library has no {subblock} variant {label!r}; "
                              f"it has {self.labels(layer, subblock)}")
        file = str(row.iloc[0]["file"])
        if file and initial:
            file = "init/" + Path(file).name
        return self.directory / file if file else None

    def variant_state(self, layer: int, subblock: str, label: str, *, initial: bool = False) -> dict[str, torch.Tensor]:
        """The module state dict of one variant (empty for a no-op); ``initial``: before BLD."""
        file = self.variant_file(layer, subblock, label, initial=initial)
        return read_state(file) if file is not None else {}

    def assemble(self, blocks: Sequence[BlockConfig], *, dtype: torch.dtype = torch.float32,
                 initial: bool = False) -> PuzzleForCausalLM:
        """The runtime model of an architecture whose every sub-block is a library variant.

        ``initial=True`` uses the variants as initialized from the parent, before BLD.
        """
        from puzzle.model.weights import model_from_state_dict

        parent = self._check_blocks(blocks)
        state = dict(read_state(self.directory / "shared.safetensors"))
        for i, b in enumerate(blocks):
            for sub, cfg in (("attention", b.attention), ("ffn", b.ffn)):
                for name, t in self.variant_state(i, sub, cfg.label, initial=initial).items():
                    state[f"model.layers.{i}.{name}"] = t
        return model_from_state_dict(parent.with_blocks(list(blocks)), state, dtype=dtype)

    def assemble_layers(self, blocks: Sequence[BlockConfig], layers: Sequence[int], *, embed: bool = False,
                        head: bool = False, dtype: torch.dtype = torch.float32, initial: bool = False) -> PuzzleForCausalLM:
        """The runtime model of :meth:`assemble` with only some parts read: the decoder ``layers``, the embedding when
        ``embed``, the final norm and LM head when ``head`` (a tied head reads the embedding); every other parameter
        stays on the meta device, as :func:`puzzle.loading.load_layers` leaves them. One rank's share of a child
        measured or trained with its layers split over the ranks."""
        from puzzle.loading import read_tensor
        from puzzle.model.weights import adopt, meta_model, part_weight_names

        config = self._check_blocks(blocks).with_blocks(list(blocks))
        outside = sorted({l for l in layers if not 0 <= l < config.num_hidden_layers})
        if outside:
            raise SchemaError(f"layers {outside} are outside 0..{config.num_hidden_layers - 1} of the library's parent")
        model = meta_model(config)
        where = self._tensor_sources(blocks, initial=initial, layers=layers)
        state = {k: read_tensor(*where[k], dtype=dtype) for k in part_weight_names(model, layers, embed=embed, head=head)}
        adopt(model, state, dtype=dtype)
        return model

    def _check_blocks(self, blocks: Sequence[BlockConfig]) -> PuzzleConfig:
        parent = self.parent_config
        if len(blocks) != parent.num_hidden_layers:
            raise SchemaError(f"the architecture has {len(blocks)} blocks but the library's parent has "
                              f"{parent.num_hidden_layers} layers")
        return parent

    def assemble_to(self, blocks: Sequence[BlockConfig], out_dir: str | Path, *, dtype: torch.dtype | None = torch.float32,
                    initial: bool = False, overwrite: bool = False) -> Path:
        """Write the runtime directory of :meth:`assemble` without building the model: the config,
        the shared and variant tensors copied one at a time (cast to ``dtype``; None keeps the stored
        one), and the library's tokenizer files, atomically. The same directory as
        ``save_runtime(self.assemble(blocks, dtype=dtype), out_dir, source=<the library>)``, byte for
        byte; peak memory is one tensor in flight (:func:`puzzle.export.memory.assembly_peak_bytes`)."""
        from puzzle.io import (atomic_directory, atomic_write_json, copy_tokenizer_files, save_safetensors_streamed,
                               stored_dtype)
        from puzzle.loading import read_tensor
        from puzzle.model.weights import meta_model, runtime_weight_names

        config = self._check_blocks(blocks).with_blocks(list(blocks))
        where = self._tensor_sources(blocks, initial=initial)  # runtime name -> (file, stored name)
        model = meta_model(config)
        want = runtime_weight_names(model)
        missing, unexpected = sorted(set(want) - where.keys()), sorted(where.keys() - set(want))
        if missing or unexpected:
            raise CorruptArtifactError(f"{self.directory}: the library's tensors do not match the architecture: "
                                       f"missing {missing[:6]}, unexpected {unexpected[:6]}")
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        specs = {k: (shapes[k], dtype or stored_dtype(*where[k])) for k in want}
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            save_safetensors_streamed(specs, lambda k: read_tensor(*where[k], dtype=specs[k][1]), tmp)
            atomic_write_json(tmp / "config.json", _runtime_config_json(config))
            copy_tokenizer_files(self.directory, tmp)
        return Path(out_dir)

    def _tensor_sources(self, blocks: Sequence[BlockConfig], *, initial: bool,
                        layers: Sequence[int] | None = None) -> dict[str, tuple[Path, str]]:
        """Where each runtime tensor of the child lives: (file, name in that file), from file headers; only
        ``layers``' variants when given."""
        shared = self.directory / "shared.safetensors"
        where = {k: (shared, k) for k in _tensor_names(shared)}
        for i, b in enumerate(blocks):
            if layers is not None and i not in layers:
                continue
            for sub, cfg in (("attention", b.attention), ("ffn", b.ffn)):
                file = self.variant_file(i, sub, cfg.label, initial=initial)
                if file is not None:
                    where.update({f"model.layers.{i}.{k}": (file, k) for k in _tensor_names(file)})
        return where


def open_library(directory: str | Path) -> Library:
    return Library(directory)
