"""Resumable BLD: step checkpoints within a round, and a record of the completed rounds.

    bld/ckpt/round-002/step-000040/L007.safetensors   variant weights + AdamW state of layer 7, its loss rows
    bld/ckpt/latest.json                              {"round": 2, "step": 40, "config_sha256": ...}, written last
    bld/rounds.json                                   {"config_sha256": ..., "rounds": [{"variants", "final"}, ...]}
    bld/rounds/round-001.losses.csv                   the loss / validation rows of completed round 1

Each layer file is written atomically by the rank owning it; once every rank is done, rank 0
rewrites ``latest.json`` (atomically) and deletes older steps. A kill at any moment leaves the
previous complete checkpoint in force. When a round ends, rank 0 writes its rows, then appends it
to ``rounds.json`` (atomically): a rerun skips the variants of recorded rounds. Tensors only:
nothing is pickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from block_library.artifact import read_state, write_state
from puzzle.errors import CorruptArtifactError
from puzzle.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

LATEST = "latest.json"
ROUNDS = "rounds.json"
ROW_COLUMNS = {"losses": ["step", "layer", "subblock", "variant", "train_nmse", "lr"],
               "validation": ["step", "layer", "subblock", "variant", "val_nmse"]}


def _step_dir(root: Path, step: int, round_index: int) -> Path:
    return root / f"round-{round_index:03d}" / f"step-{step:06d}"


def save_layer(root: Path, step: int, layer: int, modules: dict[str, torch.nn.Module],
               optimizer: torch.optim.Optimizer, rows: dict[str, list[dict[str, Any]]], *, round_index: int = 0) -> None:
    """Write one layer's variants of round ``round_index``, their optimizer state and log rows for ``step``."""
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
    write_state(tensors, _step_dir(root, step, round_index) / f"L{layer:03d}.safetensors", metadata={"rows": json.dumps(rows)})


def commit(root: Path, step: int, config_sha256: str, *, round_index: int = 0) -> None:
    """Make ``step`` of round ``round_index`` the checkpoint in force (call after every rank saved its layers).

    ``config_sha256`` names what the checkpoint is valid for (the config and the round's variants).
    """
    atomic_write_json(root / LATEST, {"round": round_index, "step": step, "config_sha256": config_sha256})
    keep = _step_dir(root, step, round_index)
    for old in [*root.glob("round-*/step-*"), *root.glob("round-*")]:
        if old not in (keep, keep.parent):
            shutil.rmtree(old, ignore_errors=True)


def latest_step(root: Path, config_sha256: str, *, round_index: int = 0) -> int:
    """The committed step of round ``round_index`` to resume from, or 0 (none, or another config or round)."""
    path = root / LATEST
    if not path.is_file():
        return 0
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path} is not valid JSON: {e}; delete {root} to restart BLD") from None
    if data.get("config_sha256") != config_sha256 or data.get("round", 0) != round_index:
        return 0
    return int(data["step"])


def load_layer(root: Path, step: int, layer: int, modules: dict[str, torch.nn.Module],
               optimizer: torch.optim.Optimizer, *, round_index: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Restore one layer's variants and optimizer state; return its log rows."""
    from safetensors import safe_open

    path = _step_dir(root, step, round_index) / f"L{layer:03d}.safetensors"
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


def completed_rounds(bld_dir: Path, config_sha256: str) -> list[dict[str, Any]]:
    """The rounds recorded for this config: ``{"variants": [keys of rank 0, ...], "final": {key: nmse}}`` each."""
    path = bld_dir / ROUNDS
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path} is not valid JSON: {e}; delete it to retrain every round") from None
    return list(data["rounds"]) if data.get("config_sha256") == config_sha256 else []


def save_round(bld_dir: Path, config_sha256: str, rounds: list[dict[str, Any]],
               rows: dict[str, list[dict[str, Any]]]) -> None:
    """Record a completed round: write its rows, then ``rounds`` (every completed round, the new one last)."""
    import pandas as pd

    index = len(rounds) - 1
    for name, columns in ROW_COLUMNS.items():
        text = pd.DataFrame(rows[name], columns=columns).to_csv(index=False)
        atomic_write_text(bld_dir / "rounds" / f"round-{index:03d}.{name}.csv", text)
    atomic_write_json(bld_dir / ROUNDS, {"config_sha256": config_sha256, "rounds": rounds})


def round_rows(bld_dir: Path, index: int, name: str) -> pd.DataFrame:
    """The ``losses`` or ``validation`` rows of completed round ``index``."""
    import pandas as pd

    return pd.read_csv(bld_dir / "rounds" / f"round-{index:03d}.{name}.csv")


def clear_rounds(bld_dir: Path) -> None:
    """Forget the completed rounds (once their rows are merged into the library)."""
    (bld_dir / ROUNDS).unlink(missing_ok=True)
    shutil.rmtree(bld_dir / "rounds", ignore_errors=True)
