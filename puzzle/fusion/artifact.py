"""The fusion stage's output directory, written atomically (complete or absent)::

    out/
      model/            the fused model as a DeciLM checkpoint (one block per fused segment); the
                        layer-sharded fusion (puzzle.fusion.sharded) writes a runtime directory instead
      blocks.json       its block configs (what `puzzle solve` / `puzzle profile` read)
      report.csv        one row per fused segment, then the whole fused model ("all")
      latency.csv       unfused vs fused step time per target and scenario, predicted and measured
      dependency.json   the pairwise dependency matrix of every run
      dependency.png    those matrices as heatmaps, fused segments outlined
      manifest.json     stage, source, config, segments
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from puzzle import __version__
from puzzle.fusion.dependency import RunDependency
from puzzle.fusion.pipeline import FusionConfig, FusionResult
from puzzle.fusion.runs import Segment
from puzzle.io import atomic_directory, atomic_write_json, atomic_write_text
from puzzle.schema import BlockConfig, save_blocks

log = logging.getLogger(__name__)


def _config_dict(cfg: FusionConfig) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["segments"] = [s.label for s in cfg.segments] if cfg.segments is not None else None
    out["scenarios"] = [sc.to_dict() for sc in cfg.scenarios]
    out["targets"] = [t if isinstance(t, str) else t.name for t in cfg.targets]
    return out


def plot_dependencies(deps: list[RunDependency], segments: list[Segment], path: Path) -> None:
    """Heatmaps of the dependency matrices (rows: removed layer i, columns: affected layer j)."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone
    import numpy as np
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(4.2 * len(deps) + 1, 4.0))
    axes = fig.subplots(1, len(deps), squeeze=False)
    vmax = max((max(max(r) for r in d.matrix) for d in deps), default=1.0) or 1.0
    for ax, d in zip(axes[0], deps):
        m = np.array(d.matrix)
        m[np.tril_indices(len(m))] = np.nan
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax)
        ticks = list(range(len(m)))
        ax.set_xticks(ticks, [str(d.run.start + t) for t in ticks], fontsize=7)
        ax.set_yticks(ticks, [str(d.run.start + t) for t in ticks], fontsize=7)
        ax.set_xlabel("affected layer j")
        ax.set_ylabel("removed layer i")
        ax.set_title(f"run {d.run.label}")
        for s in segments:
            if d.run.start <= s.start and s.stop <= d.run.stop:
                lo = s.start - d.run.start
                ax.add_patch(Rectangle((lo - 0.5, lo - 0.5), len(s), len(s), fill=False, edgecolor="red", lw=2))
    fig.colorbar(im, ax=axes[0].tolist(), label="1 - cos(f_j, f_j without i)")
    fig.suptitle("FFN dependency (red: fused segments)")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def write_fusion(result: FusionResult, out_dir: str | Path, *, config: FusionConfig, source: str,
                 source_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write ``result`` to ``out_dir`` (see the module docstring); the source directory is protected."""
    from puzzle.export import export_decilm

    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        export_decilm(result.model, tmp / "model", source_dir=source_dir)
        write_fusion_files(tmp, blocks=result.model.config.blocks, report=result.report, latency=result.latency,
                           dependencies=result.dependencies, segments=result.segments, config=config, source=source,
                           distill_losses=result.distill_losses)
    log.info("wrote %s", out_dir)
    return out_dir


def write_fusion_files(directory: Path, *, blocks: list[BlockConfig], report: pd.DataFrame, latency: pd.DataFrame,
                       dependencies: list[RunDependency], segments: list[Segment], config: FusionConfig, source: str,
                       distill_losses: dict[str, list[float]], extra: dict[str, Any] | None = None) -> None:
    """Everything of the output directory but the model: blocks, report, latency, dependencies, manifest
    (``extra`` joins the manifest)."""
    save_blocks(blocks, directory / "blocks.json")
    atomic_write_text(directory / "report.csv", report.to_csv(index=False))
    atomic_write_text(directory / "latency.csv", latency.to_csv(index=False))
    atomic_write_json(directory / "dependency.json", {"runs": [d.to_dict() for d in dependencies]})
    if dependencies:
        plot_dependencies(dependencies, segments, directory / "dependency.png")
    atomic_write_json(directory / "manifest.json", {
        "stage": "fuse", "puzzle_version": __version__, "source": source,
        "config": _config_dict(config), "segments": [s.label for s in segments],
        "distill_losses": distill_losses, **(extra or {}),
    })
