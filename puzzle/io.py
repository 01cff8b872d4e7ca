"""Atomic artifact writes and safetensors-only weight reading.

Everything this toolkit writes goes to a temporary sibling first and is renamed into place, so
an interrupted run leaves either the old artifact or the new one, never half of one. Weights are
read from safetensors only: pickle-based files (.bin, .pt, .pth) can run code when loaded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from puzzle.errors import ConfigError, CorruptArtifactError, ModelFilesError, UnsafeCheckpointError
from puzzle.os_errors import os_error_of
from solvers.files import atomic_write_text, current_umask

T = TypeVar("T")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


@contextlib.contextmanager
def _naming(path: str | Path) -> Iterator[None]:
    """Inside the block, an ``OSError`` that names no file (a full disk met by ``write`` or ``fsync``)
    is given ``path``, so the one line the CLI prints says where (:mod:`puzzle.os_errors`)."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            e.filename = str(path)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; it becomes ``path`` only if the block succeeds,
    and is removed otherwise (a full disk leaves no half-written file behind)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with _naming(path):
            yield tmp
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block succeeds.

    With ``overwrite=False`` an existing non-empty ``path`` is an error (raised before any work).
    With ``overwrite=True`` the old directory is replaced only after the new one is complete.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already exists and is not empty; choose another path or overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: Path, path: Path) -> None:
    """Move the complete directory ``new`` to ``path``; an existing ``path`` is removed only afterwards."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(old, path)  # the old directory back where it was: never neither
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, path)


def safetensors_files(directory: str | Path) -> list[Path]:
    """The safetensors weight files of a checkpoint directory, honouring a shard index.

    Raises :class:`UnsafeCheckpointError` when only pickle-based weights exist and
    :class:`ModelFilesError` when there are no weights at all.
    """
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CorruptArtifactError(f"{index} is not a valid shard index: {e}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFilesError(f"{directory}: shard index lists missing files {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{directory} has only pickle-based weights {pickles}. puzzle loads safetensors only, "
            "since unpickling can run arbitrary code. Convert once, in an environment you trust: "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir_out)` writes safetensors."
        )
    raise ModelFilesError(f"{directory} has no weights (*.safetensors)")


def load_safetensors(directory: str | Path) -> dict[str, Any]:
    """Read all tensors of a checkpoint directory into one CPU state dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for f in safetensors_files(directory):
        try:
            part = load_file(str(f), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CorruptArtifactError(f"cannot read {f}: {e} (truncated or not a safetensors file?)") from None
        overlap = state.keys() & part.keys()
        if overlap:
            raise CorruptArtifactError(f"{f} repeats tensors already read: {sorted(overlap)[:5]}")
        state.update(part)
    return state


def save_safetensors(
    state: dict[str, Any], directory: str | Path, *, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Write a state dict as ``model.safetensors`` or as shards with an HF-style index.

    ``directory`` is expected to be a temporary directory that is renamed into place afterwards
    (see :func:`atomic_directory`); the files themselves are written directly.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.contiguous() for name, t in state.items()}
    sizes = {name: t.numel() * t.element_size() for name, t in state.items()}
    plan = plan_shards(sizes, max_shard_bytes=max_shard_bytes)
    for fname, shard in plan.items():
        with atomic_file(directory / fname) as tmp:
            try:
                save_file({k: state[k] for k in shard}, str(tmp), metadata={"format": "pt"})
            except Exception as e:  # safetensors wraps a failed write (a full disk) in SafetensorError
                if (found := os_error_of(e)) is None:
                    raise
                raise found from e
    _write_shard_index(directory, plan, sizes)
    return list(plan)


def plan_shards(sizes: dict[str, int], *, max_shard_bytes: int) -> dict[str, list[str]]:
    """File name -> tensor names: names in sorted order, a new shard whenever the next tensor would
    push the current one past ``max_shard_bytes`` (one file ``model.safetensors`` when all fit)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(sizes):
        if shards[-1] and size + sizes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += sizes[name]
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}


def _write_shard_index(directory: Path, plan: dict[str, list[str]], sizes: dict[str, int]) -> None:
    if len(plan) == 1:
        return
    weight_map = {k: fname for fname, shard in plan.items() for k in shard}
    atomic_write_json(directory / "model.safetensors.index.json",
                      {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})


# safetensors' dtype names, in the order of its Rust ``Dtype`` enum: a file lays out its tensors by
# dtype in reverse enum order (widest first), then by name.
_SAFETENSORS_DTYPES = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                       "F64", "I64", "U64")


def _dtype_codes() -> dict[Any, str]:
    """torch dtype -> safetensors dtype name."""
    import torch

    return {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
            torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
            torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
            torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}


def _safetensors_dtype(dtype: Any) -> str:
    codes = _dtype_codes()
    if dtype not in codes:
        raise ValueError(f"safetensors cannot store {dtype}")
    return codes[dtype]


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """A safetensors file's header (name -> dtype, shape, data_offsets; ``__metadata__``), no data read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 2**30:
                raise ValueError(f"header length {n}")
            return json.loads(f.read(n))
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CorruptArtifactError(f"cannot read the header of {path}: {e} (truncated or not a safetensors file?)") from None


def stored_dtype(path: str | Path, name: str) -> Any:
    """The torch dtype of the tensor ``name`` as stored in the safetensors file ``path``."""
    header = safetensors_header(path)
    if name not in header:
        raise CorruptArtifactError(f"{path} has no tensor {name}")
    code = header[name]["dtype"]
    by_code = {c: d for d, c in _dtype_codes().items()}
    if code not in by_code:
        raise CorruptArtifactError(f"{path}: {name} has dtype {code}, which puzzle does not read")
    return by_code[code]


def save_safetensors_streamed(specs: dict[str, tuple[tuple[int, ...], Any]], read: Callable[[str], Any],
                              directory: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write tensors that are produced one at a time: the same files :func:`save_safetensors` writes
    for the same state dict, byte for byte, holding one tensor at a time instead of them all.

    ``specs``: name -> (shape, torch dtype) of every tensor, known before any is read (it fixes the
    file headers). ``read(name)`` returns that tensor (CPU); it is written and dropped at once. A
    tensor whose shape or dtype differs from its spec raises :class:`CorruptArtifactError`.
    """
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {k: math.prod(shape) * dtype.itemsize for k, (shape, dtype) in specs.items()}
    plan = plan_shards(sizes, max_shard_bytes=max_shard_bytes)
    for fname, shard in plan.items():
        # safetensors' layout: widest dtype first, then by name; offsets contiguous from 0
        order = sorted(shard, key=lambda k: (-_SAFETENSORS_DTYPES.index(_safetensors_dtype(specs[k][1])), k))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for k in order:
            shape, dtype = specs[k]
            header[k] = {"dtype": _safetensors_dtype(dtype), "shape": list(shape),
                         "data_offsets": [offset, offset + sizes[k]]}
            offset += sizes[k]
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        with atomic_file(directory / fname) as tmp, open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for k in order:
                t = read(k)
                if tuple(t.shape) != tuple(specs[k][0]) or t.dtype != specs[k][1]:
                    raise CorruptArtifactError(f"{k}: got {tuple(t.shape)} {t.dtype}, expected "
                                               f"{tuple(specs[k][0])} {specs[k][1]}")
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del t
    _write_shard_index(directory, plan, sizes)
    return list(plan)


def copy_tokenizer_files(source_dir: str | Path, dest_dir: str | Path) -> list[str]:
    """Copy the tokenizer files (and generation config) that exist in ``source_dir``."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, Path(dest_dir) / name)
            copied.append(name)
    return copied


def read_json_file(path: str | Path) -> Any | None:
    """The JSON in ``path``, or None when there is no such file; garbled JSON is a
    :class:`CorruptArtifactError` naming the file (manifests of every stage are read this way)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:  # binary garbage where JSON was written
        raise CorruptArtifactError(f"{path} is not valid JSON: byte 0x{e.object[e.start]:02x} at offset "
                                   f"{e.start} is not UTF-8 text") from None


def read_user_text(path: str | Path, *, what: str, error: type[Exception] = ConfigError) -> str:
    """The text of a file the user named (``what``: "config file", "architecture file"), or ``error``
    saying in one line why not: it does not exist, it is a directory, it cannot be read, or it is not
    UTF-8 text (a binary file passed by mistake, which YAML and JSON would otherwise report as a
    decoding traceback or as an "unacceptable character")."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory; name a file")
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if b"\x00" in data:
        raise error(f"{what} {path} is binary, not text (it holds NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                    "is it a binary file?") from None


def read_yaml_config(path: str | Path) -> Any:
    """The YAML in a user's config file; a missing, binary or unreadable file or bad YAML is a
    :class:`ConfigError` of one line."""
    import yaml

    text = read_user_text(path, what="config file")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {one_line(str(e))}") from None


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of blanks made single spaces (parsers' messages span lines)."""
    return " ".join(text.split())


def config_from_yaml(path: str | Path, from_dict: Callable[[Any], T]) -> T:
    """``from_dict`` of the YAML in the user's config file ``path``; its :class:`ConfigError` names the file."""
    data = read_yaml_config(path)
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def check_writable(flag: str, given: str | Path, existing: Path, *, what: str = "a directory") -> None:
    """:class:`~puzzle.errors.ConfigError` unless this process may create files in ``existing`` (the output
    ``given`` as ``flag``, or its nearest existing ancestor, where it would be made). ``os.access`` asks the
    kernel without writing: it answers for file modes, ACLs and a read-only mount (EROFS) alike; root passes
    file modes, as it writes through them."""
    import os

    from puzzle.errors import ConfigError

    if os.access(existing, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "on a read-only file system" if read_only else "permission denied"
    raise ConfigError(f"{flag} {given}: {existing} is not writable ({why}); choose {what} you can write to")
