"""The GKD directory: manifest, learning curve, resumable checkpoint and the distilled child.

    gkd/
      manifest.json                 stage "gkd", status (running | complete), inputs (config, child and
                                    parent fingerprints, layer map, token hashes), initial/final metrics
      curve.csv                     one row per step (see CURVE_COLUMNS); step 0 is the child as given
      checkpoint/state.safetensors  child weights + AdamW moments and step counts, by parameter name (whole
                                    tensors, also of a sharded run: rank 0 writes them, every rank reads them)
      checkpoint/state.json         step, data position, the curve rows so far (removed once complete)
      child/                        the distilled child: a runtime directory (``load_model`` reads it)

A rerun with the same inputs resumes from the checkpoint (or does nothing once complete); with
other inputs it raises :class:`StaleArtifactError` naming what changed, unless forced. Tensors
only: nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from puzzle.distill import sharding
from puzzle.errors import ConfigError, CorruptArtifactError, StaleArtifactError
from puzzle.io import atomic_directory, atomic_write_json, atomic_write_text, read_json_file
from puzzle.model import PuzzleForCausalLM

log = logging.getLogger(__name__)

STAGE = "gkd"
MANIFEST = "manifest.json"
CURVE = "curve.csv"
CHECKPOINT = "checkpoint"
CHILD = "child"
CURVE_COLUMNS = ["step", "lr", "train_loss", "train_kl", "train_cos", "train_lm",
                 "val_kl", "val_top1", "val_lm", "val_cos"]
_GENERIC = {"transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype"}


def model_fingerprint(model: PuzzleForCausalLM) -> str:
    """sha256 of a model's config (without provenance fields) and every parameter's name, dtype and bytes."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _GENERIC}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def ids_sha256(ids: torch.Tensor) -> str:
    """sha256 of token ids (N, T): catches a changed corpus or tokenizer."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def inputs_sha256(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def read_manifest(out: Path) -> dict[str, Any] | None:
    data = read_json_file(out / MANIFEST)
    if data is not None and data.get("stage") != STAGE:
        raise ConfigError(f"{out} holds a {data.get('stage')!r} artifact, not a GKD run; choose another --out")
    return data


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    old_cfg, new_cfg = old.get("config", {}), new["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            out.append(f"config {key} ({old_cfg.get(key)!r} -> {new_cfg.get(key)!r})")
    what = {"child_sha256": "the child (weights or architecture)",
            "parent_sha256": "the parent (weights or architecture)",
            "layer_map": "the layer map", "train_ids_sha256": "the training tokens (corpus or tokenizer)",
            "val_ids_sha256": "the validation tokens (corpus or tokenizer)"}
    out += [text for key, text in what.items() if old.get(key) != new.get(key)]
    return out


def prepare(out: Path, inputs: dict[str, Any], *, force: bool) -> dict[str, Any] | None:
    """Check ``out`` against ``inputs``. Return the manifest of a complete run of the same inputs (nothing
    to do); else mark the run as running (clearing it first when forced) and return None."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    old = read_manifest(out) if out.is_dir() else None
    if old is None and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out} holds files but no GKD manifest; choose another --out")
    if old is not None:
        changed = _changes(old.get("inputs", {}), inputs)
        if force:
            clear(out)
        elif changed:
            raise StaleArtifactError(f"{out} holds a GKD run of other inputs: {'; '.join(changed)}. "
                                     "Pass --force (force=True) to start over, or choose another --out")
        elif old.get("status") == "complete":
            return old
    out.mkdir(parents=True, exist_ok=True)
    if old is None or force:
        atomic_write_json(out / MANIFEST, {"stage": STAGE, "status": "running", "inputs": inputs})
    return None


def clear(out: Path) -> None:
    """Remove every output of a GKD run (and nothing else) from ``out``."""
    for name in (CHECKPOINT, CHILD):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (CURVE, MANIFEST):
        (out / name).unlink(missing_ok=True)


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """A curve row without missing values (JSON has no NaN)."""
    return {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}


def curve_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=CURVE_COLUMNS).astype({"step": int})


def write_curve(out: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    curve = curve_frame(rows)
    atomic_write_text(out / CURVE, curve.to_csv(index=False))
    return curve


def read_curve(out: Path) -> pd.DataFrame:
    path = out / CURVE
    if not path.is_file():
        raise CorruptArtifactError(f"{path} is missing; rerun with --force")
    return pd.read_csv(path)


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                   keep: bool = True) -> dict[str, torch.Tensor]:
    """Child weights and AdamW state, whole, on the CPU, as a checkpoint holds them (``param/NAME``,
    ``exp_avg/NAME``, ``exp_avg_sq/NAME``, ``step/NAME``). Sharded tensors are gathered one at a time, a
    collective: every rank calls this, and only the one that writes keeps them (``keep``; else ``{}``)."""
    tensors: dict[str, torch.Tensor] = {}

    def add(key: str, t: torch.Tensor) -> None:
        t = sharding.gather(t)
        if keep:
            tensors[key] = t

    for name, p in model.named_parameters():  # tied weights appear once
        add(f"param/{name}", p)
        st = optimizer.state.get(p, {})
        for field in ("exp_avg", "exp_avg_sq"):
            if field in st:
                add(f"{field}/{name}", st[field])
        if "step" in st:
            add(f"step/{name}", torch.as_tensor(st["step"], dtype=torch.float32).reshape(1))
    return tensors


def save_checkpoint(out: Path, *, step: int, tensors: dict[str, torch.Tensor], rows: list[dict[str, Any]],
                    inputs_key: str, data_position: int) -> None:
    """:func:`training_state` and the curve so far, as one atomically replaced directory."""
    from safetensors.torch import save_file

    state = {"step": step, "inputs_sha256": inputs_key, "data_position": data_position,
             "rows": [_clean(r) for r in rows]}
    with atomic_directory(out / CHECKPOINT, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"),
                  metadata={"format": "pt"})
        atomic_write_json(tmp / "state.json", state)


def load_checkpoint(out: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    inputs_key: str) -> tuple[int, list[dict[str, Any]]]:
    """Restore the checkpoint into ``model`` and ``optimizer`` (sharded ones take their shards): (step, curve
    rows), or (0, []) when none. Tensors are read one at a time."""
    from safetensors import SafetensorError, safe_open

    root = out / CHECKPOINT
    if not (root / "state.json").is_file():
        return 0, []
    try:
        state = json.loads((root / "state.json").read_text())
        if state.get("inputs_sha256") != inputs_key:
            raise StaleArtifactError(f"the checkpoint {root} was written for other inputs; pass --force to start over")
        with safe_open(str(root / "state.safetensors"), framework="pt", device="cpu") as f, torch.no_grad():
            names = set(f.keys())
            for name, p in model.named_parameters():
                if f"param/{name}" not in names:
                    raise CorruptArtifactError(f"{root} lacks {name}; delete it to restart GKD")
                p.copy_(sharding.place(f.get_tensor(f"param/{name}"), p))
                if f"exp_avg/{name}" in names:
                    optimizer.state[p] = {
                        "step": f.get_tensor(f"step/{name}").reshape(()).clone(),
                        "exp_avg": sharding.place(f.get_tensor(f"exp_avg/{name}"), p),
                        "exp_avg_sq": sharding.place(f.get_tensor(f"exp_avg_sq/{name}"), p),
                    }
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise CorruptArtifactError(f"cannot read the checkpoint {root}: {e}; delete it to restart GKD") from None
    return int(state["step"]), list(state["rows"])


def files_fingerprint(model: PuzzleForCausalLM) -> str:
    """sha256 of a stored model's config and its weight files' names and bytes (``model`` is on the meta
    device; each file is read once, then its hash is cached by file identity: :mod:`puzzle.parents.hashes`)."""
    from puzzle.io import safetensors_files
    from puzzle.parents.hashes import content_sha256

    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _GENERIC}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for f in safetensors_files(model.name_or_path):
        h.update(f"{f.name}:{content_sha256(f)}".encode())
    return h.hexdigest()


def save_child_sharded(out: Path, model: PuzzleForCausalLM, tokenizer: Any, shard: Any) -> Path:
    """Write an FSDP2-sharded child as a runtime directory, one tensor at a time: rank 0 names the tensor
    it writes next, every rank all-gathers it (a collective), rank 0 writes it and drops it. Call on every rank."""
    from puzzle.distill.sharding import gather, is_writer
    from puzzle.io import save_safetensors_streamed
    from puzzle.loading import runtime_config_dict

    params = dict(model.named_parameters())
    if model.config.tie_word_embeddings:
        params.pop("lm_head.weight", None)

    def fetch(name: str | None) -> torch.Tensor | None:
        box = [name]
        if shard is not None and shard.world > 1:
            torch.distributed.broadcast_object_list(box, src=0)
        return None if box[0] is None else gather(params[box[0]]).float()

    if is_writer(shard):
        specs = {k: (tuple(p.shape), torch.float32) for k, p in params.items()}
        with atomic_directory(out / CHILD, overwrite=True) as tmp:
            save_safetensors_streamed(specs, fetch, tmp)
            fetch(None)  # the other ranks stop following
            atomic_write_json(tmp / "config.json", runtime_config_dict(model.config))
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(tmp))
    else:
        while fetch(None) is not None:  # follow rank 0's names until it says None
            pass
    return out / CHILD


def save_child(out: Path, model: PuzzleForCausalLM, tokenizer: Any) -> Path:
    """The distilled child as a runtime directory, with the tokenizer's files when it can save them."""
    from puzzle.loading import save_runtime

    with atomic_directory(out / CHILD, overwrite=True) as tmp:
        save_runtime(model, tmp, overwrite=True)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(tmp))
        else:
            log.info("the tokenizer cannot save itself: %s has no tokenizer files", out / CHILD)
    return out / CHILD


def finish(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Mark the run complete (after the child is saved), then drop the checkpoint."""
    atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    return manifest
