"""A model directory's runtime tensors, one at a time: what the streamed export writes.

    specs, read, stored = streamed_runtime_tensors(resolve_source(d), load_config(d), dtype=None)
    specs["model.norm.weight"]      # ((H,), torch.float32): shape and output dtype, known before any read
    read("model.norm.weight")       # that tensor, read from its file alone (memory-mapped while copied)

The names, the map from stored tensors (:func:`puzzle.loading.weight_source`) and the checks are
those of :func:`puzzle.loading.load_model`, so the tensors equal ``load_model(d, dtype=None)``'s
state dict (a tied ``lm_head.weight`` left out, as checkpoints store it) cast to the output dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from puzzle.errors import CorruptArtifactError
from puzzle.io import stored_dtype
from puzzle.loading import Source, read_tensor, tensor_files, weight_source
from puzzle.model import PuzzleConfig
from puzzle.model.weights import meta_model, runtime_weight_names
from puzzle.parents.hf import hf_ignored

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


def streamed_runtime_tensors(src: Source, config: PuzzleConfig, *, dtype: torch.dtype | None
                             ) -> tuple[Specs, Callable[[str], torch.Tensor], torch.dtype]:
    """``(specs, read, stored)``: every runtime tensor's shape and output dtype, a reader of one tensor,
    and the stored dtype of the embedding (the output dtype when ``dtype`` is None)."""
    model = meta_model(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = runtime_weight_names(model)
    where = tensor_files(src.directory)
    sources = {name: weight_source(src, name, config) for name in names}
    absent = [(name, k) for name, ws in sources.items() for k in ws.names if k not in where]
    if absent:
        raise CorruptArtifactError(f"{src.directory}: the checkpoint has no {absent[0][1]} (for {absent[0][0]})")
    used = {k for ws in sources.values() for k in ws.names}
    hf = src.kind in ("hf", "embedded")
    unexpected = sorted(k for k in where if k not in used and not (hf and hf_ignored(k, config)))
    if unexpected:
        raise CorruptArtifactError(f"{src.directory}: weights do not match the architecture: unexpected "
                                   f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
    first = sources["model.embed_tokens.weight"].names[0]
    stored = stored_dtype(where[first], first)
    out = dtype or stored

    def read(name: str) -> torch.Tensor:
        ws = sources[name]
        if ws.transform is None:  # one stored tensor: mapped, cast into its own memory, unmapped
            return read_tensor(where[ws.names[0]], ws.names[0], dtype=out)
        return ws.read(lambda k: read_tensor(where[k], k, dtype=None)).to(out)

    return {name: (shapes[name], out) for name in names}, read, stored
