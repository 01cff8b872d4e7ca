"""The teacher-targets file on disk, a row at a time: written chunk by chunk, read a rank's rows only.

    with TargetsWriter(path, n=N, seq_len=T, top_k=k, hidden_size=H, key=key, labels=False) as w:
        w.write(0, logp, index, rest, hidden)          # rows 0 .. b-1, any order, each once
    tensors, meta = read_rows(path, rows=[3, 7, 8])    # those rows of every tensor, (3, ...)

The file is a plain safetensors file (:func:`puzzle.distill.teacher_cache.load_targets` reads it whole): the
header, with every tensor's shape and place, is written first and the file is sized at once; each chunk's rows
then go where they belong in each tensor (a tensor is row-major, so a sequence's rows are contiguous). The writer
holds one chunk, never the whole cache: a 405B parent's targets of 200 steps of 64 x 1024 tokens are 400 GiB. It
writes a temporary sibling and renames it over ``path`` when every row has been written (:meth:`commit`), so a
crash leaves no partial file where a reader looks.

A reader of some rows (:func:`read_rows`) reads only their bytes: under torchrun each rank reads the rows of its
own share of every step's batch, 1/W of the file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

from puzzle.errors import CorruptArtifactError

DTYPES = {torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16"}
NAMES = ("logp", "index", "rest", "hidden", "label")


class TargetsWriter:
    """A teacher-targets file of ``n`` sequences of ``seq_len`` tokens, written a chunk of rows at a time."""

    def __init__(self, path: str | Path, *, n: int, seq_len: int, top_k: int, hidden_size: int, key: str,
                 labels: bool, fmt: str, hidden_dtype: torch.dtype = torch.bfloat16) -> None:
        N, T, k, H = n, seq_len, top_k, hidden_size
        shapes = {"logp": ((N, T - 1, k), torch.float32), "index": ((N, T - 1, k), torch.int32),
                  "rest": ((N, T - 1), torch.float32), "hidden": ((N, T, H), hidden_dtype)}
        if labels:
            shapes["label"] = ((N, T - 1), torch.float32)
        header: dict[str, object] = {"__metadata__": {"format": fmt, "key": key}}
        self.places: dict[str, tuple[int, int, torch.dtype]] = {}  # name: (offset in the data, bytes a row, dtype)
        start = 0
        for name, (shape, dtype) in shapes.items():
            row = dtype.itemsize * int(torch.Size(shape[1:]).numel())
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [start, start + N * row]}
            self.places[name] = (start, row, dtype)
            start += N * row
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.data = 8 + len(text)
        self.path, self.n, self.written = Path(path), N, torch.zeros(N, dtype=torch.bool)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.tmp, self.fd = Path(tmp), fd
        try:
            os.write(fd, struct.pack("<Q", len(text)) + text)
            os.ftruncate(fd, self.data + start)
        except BaseException:  # a full disk: no temporary file left behind
            self.abort()
            raise

    def write(self, start: int, logp: torch.Tensor, index: torch.Tensor, rest: torch.Tensor, hidden: torch.Tensor,
              label: torch.Tensor | None = None) -> None:
        """Rows ``start`` .. ``start + b - 1``: logp and index (b, T-1, k), rest (and label) (b, T-1), hidden (b, T, H)."""
        b = logp.shape[0]
        if not 0 <= start <= self.n - b:
            raise ValueError(f"rows {start}..{start + b - 1} are outside the file's {self.n}")
        given = {"logp": logp, "index": index.to(torch.int32), "rest": rest, "hidden": hidden, "label": label}
        for name, (offset, row, dtype) in self.places.items():
            t = given[name]
            if t is None:
                raise ValueError(f"the file holds {name!r}: give it")
            data = t.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes()
            if len(data) != b * row:
                raise ValueError(f"{name} of {b} rows has {len(data)} bytes, not {b * row}")
            os.pwrite(self.fd, data, self.data + offset + start * row)
        self.written[start:start + b] = True

    def commit(self) -> None:
        """The file complete: flushed and renamed over ``path``; every row must have been written."""
        if not bool(self.written.all()):
            missing = int((~self.written).sum())
            raise ValueError(f"{missing} of {self.n} rows of {self.path.name} were never written")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Nothing written: the temporary file removed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TargetsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.commit()
        finally:
            self.abort()  # after a commit, nothing left to remove


def read_rows(path: str | Path, rows: Sequence[int] | torch.Tensor | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """``(tensors, metadata, n)``: the file's tensors, only ``rows`` of each (in that order; all with None), its
    metadata and its number of rows. Runs of consecutive rows are read at once. :class:`CorruptArtifactError` when
    the file cannot be read or a row is past its end."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = [n for n in NAMES if n in f.keys()]
            n = int(f.get_slice("logp").get_shape()[0])
            if rows is None:
                return {name: f.get_tensor(name) for name in names}, meta, n
            want = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
            if want.numel() and not (0 <= int(want.min()) and int(want.max()) < n):
                raise CorruptArtifactError(f"{path} holds {n} rows, fewer than the rows asked for "
                                           f"(up to {int(want.max())})")
            runs = _runs(want.tolist())
            out = {}
            for name in names:
                s = f.get_slice(name)
                parts = [s[a:b] for a, b in runs]
                out[name] = torch.cat(parts) if parts else torch.empty((0, *s.get_shape()[1:]))
            return out, meta, n
    except CorruptArtifactError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise CorruptArtifactError(f"{path} is not a readable teacher-targets file ({type(e).__name__}: {e})") from None


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """``rows`` as half-open runs of consecutive rows, in order: [3, 4, 5, 9] -> [(3, 6), (9, 10)]."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs
