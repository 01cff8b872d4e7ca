"""Resumable BLD checkpoints: per-layer files, so any number of processes can resume any run.

    bld/ckpt/step-000040/L007.safetensors   variant weights + AdamW state of layer 7, its loss rows
    bld/ckpt/latest.json                    {"step": 40, "config_sha256": ...}, written last

Each layer file is written atomically by the rank owning it; once every rank is done, rank 0
rewrites ``latest.json`` (atomically) and deletes older steps. A kill at any moment leaves the
previous complete checkpoint in force. Tensors only: nothing is pickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from block_library.artifact import read_state, write_state
from puzzle.errors import CorruptArtifactError
from puzzle.io import atomic_write_json

LATEST = "latest.json"


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_layer(root: Path, step: int, layer: int, modules: dict[str, torch.nn.Module],
               optimizer: torch.optim.Optimizer, rows: dict[str, list[dict[str, Any]]]) -> None:
    """Write one layer's trainable variants, their optimizer state and log rows for ``step``."""
    tensors: dict[str, torch.Tensor] = {}
    for key, module in modules.items():
        for name, p in module.named_parameters():
            tensors[f"param|{key}|{name}"] = p.detach()
            st = optimizer.state.get(p, {})
            for field in ("exp_avg", "exp_avg_sq"):
                if field in st:
                    tensors[f"{field}|{key}|{name}"] = st[field]
            if "step" in st:
                tensors[f"step|{key}|{name}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    write_state(tensors, _step_dir(root, step) / f"L{layer:03d}.safetensors", metadata={"rows": json.dumps(rows)})


def commit(root: Path, step: int, config_sha256: str) -> None:
    """Make ``step`` the checkpoint in force (call after every rank saved its layers)."""
    atomic_write_json(root / LATEST, {"step": step, "config_sha256": config_sha256})
    for old in root.glob("step-*"):
        if old.name != _step_dir(root, step).name:
            shutil.rmtree(old, ignore_errors=True)


def latest_step(root: Path, config_sha256: str) -> int:
    """The committed step to resume from, or 0 (no checkpoint, or one from another config)."""
    path = root / LATEST
    if not path.is_file():
        return 0
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path} is not valid JSON: {e}; delete {root} to restart BLD") from None
    if data.get("config_sha256") != config_sha256:
        return 0
    return int(data["step"])


def load_layer(root: Path, step: int, layer: int, modules: dict[str, torch.nn.Module],
               optimizer: torch.optim.Optimizer) -> dict[str, list[dict[str, Any]]]:
    """Restore one layer's variants and optimizer state; return its log rows."""
    from safetensors import safe_open

    path = _step_dir(root, step) / f"L{layer:03d}.safetensors"
    tensors = read_state(path)
    with safe_open(str(path), framework="pt") as f:
        rows = json.loads((f.metadata() or {}).get("rows", "{}"))
    with torch.no_grad():
        for key, module in modules.items():
            for name, p in module.named_parameters():
                k = f"param|{key}|{name}"
                if k not in tensors:
                    raise CorruptArtifactError(f"{path} lacks {k}; delete {root} to restart BLD")
                p.copy_(tensors[k])
                if f"exp_avg|{key}|{name}" in tensors:
                    optimizer.state[p] = {
                        "step": tensors[f"step|{key}|{name}"].reshape(()).clone(),
                        "exp_avg": tensors[f"exp_avg|{key}|{name}"].to(p.device).clone(),
                        "exp_avg_sq": tensors[f"exp_avg_sq|{key}|{name}"].to(p.device).clone(),
                    }
    return rows


def clear(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
