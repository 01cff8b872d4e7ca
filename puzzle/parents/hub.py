"""Parents named by a Hugging Face hub id (``org/name`` or ``org/name@revision``), through huggingface_hub's cache.

    snapshot("HuggingFaceTB/SmolLM2-135M")            -> HubSnapshot(directory=<cache>/snapshots/<commit>, ...)
    snapshot("org/name@v1.0", config_only=True)       -> config.json alone (what ``puzzle plan`` reads)

Only what a parent needs is fetched: ``config.json``, safetensors weights and their index, tokenizer files
(:data:`PATTERNS`); never pickled weights (``*.bin``, ``*.pt``), never code. The standard cache, ``HF_TOKEN`` and
``HF_HUB_OFFLINE=1`` work as in transformers (huggingface_hub reads them). The commit a revision resolved to is the
snapshot directory's name (:func:`snapshot_of` reads it back from the path): ``plan.json`` records it and the
parent's fingerprint includes it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from puzzle.errors import ModelFilesError, UnknownModelError, UnsafeCheckpointError
from puzzle.io import PICKLE_SUFFIXES

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
"""``org/name`` with an optional ``@revision`` (a branch, a tag or a commit)."""
PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
            "merges.txt", "added_tokens.json")
"""What a parent is read from: config, safetensors weights and the tokenizer."""
_COMMITS: dict[str, str] = {}


@dataclass(frozen=True)
class HubSnapshot:
    repo: str
    revision: str
    """What the user asked for (``main`` when nothing was)."""
    commit: str
    """The commit it resolved to."""
    directory: Path


def is_hub_id(text: str) -> bool:
    """``org/name[@revision]`` that is not a path on this machine (callers check existing directories first)."""
    return HUB_ID.fullmatch(text) is not None and not text.startswith((".", "/", "~"))


def snapshot_of(directory: str | Path) -> tuple[str, str] | None:
    """``(repo, commit)`` when ``directory`` is a snapshot in a hub cache (``models--ORG--NAME/snapshots/COMMIT``),
    however it was named (a hub id or the path), else None."""
    path = Path(directory).resolve()
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--") or repo.count("--") < 2:
        return None
    return repo[len("models--"):].replace("--", "/", 1), path.name


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value, read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def snapshot(text: str, *, config_only: bool = False) -> HubSnapshot:
    """The local snapshot of hub id ``text``, downloaded (the files of :data:`PATTERNS`; ``config_only``: config.json
    alone) unless already cached. One-line errors: not cached while offline, unreachable, no such repository or
    revision, gated, or no safetensors weights (:class:`UnsafeCheckpointError` when it only has pickled ones)."""
    match = HUB_ID.fullmatch(text)
    if match is None:
        raise UnknownModelError(f"{text!r} is not a hub id (org/name or org/name@revision)")
    repo, revision = match["repo"], match["revision"] or "main"
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:  # pragma: no cover - installed with transformers
        raise UnknownModelError(f"{text}: reading hub ids needs huggingface_hub (pip install "
                                "huggingface_hub)") from None
    fetch = f"`hf download {repo}{'' if revision == 'main' else f' --revision {revision}'}`"
    pinned = _COMMITS.get(text, revision)  # the commit this process resolved it to first: one parent throughout
    try:
        path = Path(snapshot_download(repo, revision=pinned, local_files_only=offline(),
                                      allow_patterns=["config.json"] if config_only else list(PATTERNS)))
    except GatedRepoError:
        raise UnknownModelError(f"{repo} is gated: accept its license on the hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise UnknownModelError(f"{repo} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise UnknownModelError(f"{text} is no directory here and no hub repository (or a private one: set "
                                "HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline() else "the hub cannot be reached"
        raise UnknownModelError(f"{text} is not in the local hub cache and {why}: fetch it with {fetch} (or pass a "
                                "model directory)") from None
    except HfHubHTTPError as e:  # the hub answered with an error: a bad token, the hub down
        raise UnknownModelError(f"{text}: the hub refused it ({str(e).splitlines()[0]}); check HF_TOKEN or retry "
                                f"later, or fetch it with {fetch}") from None
    except OSError as e:  # a cache that cannot be written, a full disk
        raise ModelFilesError(f"{text}: the hub cache failed: {e.strerror or e}") from None
    snap = HubSnapshot(repo, revision, path.name, path)
    _COMMITS[text] = snap.commit
    if not (path / "config.json").is_file():
        raise ModelFilesError(f"{text} (commit {snap.commit[:12]}) has no config.json in the local hub cache: "
                              f"fetch it with {fetch}")
    if not config_only and not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled or not offline():
            raise UnsafeCheckpointError(f"{text} has no safetensors weights{f' (only {pickled[0]})' if pickled else ''}"
                                        ": puzzle never loads pickled weights; convert them to safetensors first")
        raise ModelFilesError(f"{text}: the local hub cache holds no safetensors weights and HF_HUB_OFFLINE is set: "
                              f"fetch them with {fetch}")
    return snap
