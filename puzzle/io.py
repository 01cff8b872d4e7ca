"""Atomic artifact writes and safetensors-only weight reading.

Everything this toolkit writes goes to a temporary sibling first and is renamed into place, so
an interrupted run leaves either the old artifact or the new one, never half of one. Weights are
read from safetensors only: pickle-based files (.bin, .pt, .pth) can run code when loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from puzzle.errors import CorruptArtifactError, ModelFilesError, UnsafeCheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


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
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: Path, path: Path) -> None:
    """Move the complete directory ``new`` to ``path``; an existing ``path`` is removed only afterwards."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(new, path)
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
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name in sorted(state):
        t = state[name].contiguous()
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write_json(directory / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


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


def read_yaml_config(path: str | Path) -> Any:
    """The YAML in a user's config file; a missing file or bad YAML is a :class:`ConfigError`."""
    import yaml

    from puzzle.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
