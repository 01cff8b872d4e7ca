"""Peak memory of the streamed copies, in closed form: the export from a model directory
(:func:`puzzle.export.export_decilm_dir`) and the child assembly from a block library
(:meth:`block_library.artifact.Library.assemble_to`).

Both write tensors as they read them (:func:`puzzle.io.save_safetensors_streamed`), so besides the
process itself they hold one tensor in flight: its stored bytes, memory-mapped while read, and its
copy in the output dtype. The largest tensor is the embedding (or head) or a layer's widest
projection. The shard size changes the files, not the memory. No torch here.
"""

from __future__ import annotations

from typing import Any

from block_library.memory import PROCESS_BYTES
from puzzle.evaluation.memory import largest_tensor_params


def streamed_copy_peak_bytes(config: Any, *, stored_bytes: int, dtype_bytes: int) -> float:
    """Peak resident bytes of copying every tensor of ``config``'s model one at a time."""
    return float(PROCESS_BYTES + largest_tensor_params(config) * (stored_bytes + dtype_bytes))


def export_peak_bytes(config: Any, *, stored_bytes: int = 4, dtype_bytes: int = 4) -> float:
    """:func:`~puzzle.export.export_decilm_dir` of a model of ``config`` stored with ``stored_bytes``
    per element and exported in ``dtype_bytes``."""
    return streamed_copy_peak_bytes(config, stored_bytes=stored_bytes, dtype_bytes=dtype_bytes)


def assembly_peak_bytes(config: Any, *, stored_bytes: int = 4, dtype_bytes: int = 4) -> float:
    """:meth:`~block_library.artifact.Library.assemble_to` of a child of ``config`` (library files are
    float32: ``stored_bytes=4``)."""
    return streamed_copy_peak_bytes(config, stored_bytes=stored_bytes, dtype_bytes=dtype_bytes)
