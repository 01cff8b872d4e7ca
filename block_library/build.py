"""``build_library``: resolve the search space, initialize every variant from the parent, save.

One streamed parent pass over calibration sequences gathers what the initializers need, each
variant is initialized by its family (:mod:`block_library.registry`), and one pass over the
validation sequences scores every initialization. Under a memory limit, variants are
initialized, saved and validated in rounds (:mod:`block_library.rounds`), one validation pass
each; the result is the same. The directory appears only when complete
(built under a temporary sibling, then renamed); the parent is never written.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from block_library import rounds
from block_library.artifact import INDEX, INDEX_COLUMNS, MANIFEST, STAGE, is_library, write_state
from block_library.calibration import CalibrationStats, StatsCollector
from block_library.config import LibraryConfig
from block_library.distributed import close_shard
from block_library.registry import family_of, initialize
from block_library.session import Session, load_ids, open_session, parent_fingerprint, validate, variant_params
from block_library.teacher import batches_of, run_pass
from puzzle import __version__
from puzzle.errors import ConfigError
from puzzle.io import atomic_write_json, atomic_write_text, copy_tokenizer_files, replace_directory

log = logging.getLogger(__name__)


def _needs(session: Session) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for v in session.owned_variants():
        if v.is_parent:
            continue
        for n in family_of(v).needs:
            out.setdefault(v.layer, set()).add(f"lsq:{v.subblock}" if n == "lsq" else n)
        if v.kind == "swiglu" and session.config.bld.ffn_refit:
            out.setdefault(v.layer, set()).add("ffn_gram")
    return out


def build_library(source: str, out_dir: str | Path, config: LibraryConfig | None = None, *,
                  overwrite: bool = False, progress: bool = True, max_memory_bytes: float | None = None) -> Path:
    """Build an initialized (untrained) library of ``source`` in ``out_dir``; return its path.

    ``max_memory_bytes``: a rank's memory limit; variants are initialized and validated in as many
    rounds as it takes to fit (None: one round).
    """
    config = config or LibraryConfig()
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        what = "a block library" if is_library(out) else "files"
        raise ConfigError(f"{out} already holds {what}; choose another --out or pass --overwrite")
    session = open_session(source, config)
    if out == session.source.directory.resolve() or session.source.directory.resolve() in out.parents:
        raise ConfigError(f"{out} is inside the parent's directory {session.source.directory}; never write there")
    shard = session.shard
    tmp = out.with_name(f".{out.name}.building")
    if shard.first:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "init").mkdir(parents=True)
    shard.barrier()
    try:
        _build_into(session, tmp, out, progress=progress, max_memory_bytes=max_memory_bytes)
    except BaseException:
        if shard.first:  # leave nothing half-written behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    shard.barrier()
    close_shard(shard)
    return out


def _build_into(session: Session, tmp: Path, out: Path, *, progress: bool, max_memory_bytes: float | None) -> None:
    """Calibrate, initialize, validate and write into ``tmp``; rank 0 then moves it to ``out``."""
    shard, config = session.shard, session.config
    bld = config.bld
    t0 = time.perf_counter()
    bar = tqdm(desc="calibrate", unit="seq", disable=not (progress and shard.first))

    # Calibration statistics, for this rank's layers.
    ids, n = load_ids(session, "train", bld.calib_sequences)
    collector = StatsCollector(_needs(session), eps=session.parent_config.rms_norm_eps, ridge=bld.ridge, ffn_ridge=bld.ffn_ridge)
    blocks = session.teacher.blocks

    def visit(l, x, h, y, ctx):
        collector(l, x, h, y, ctx, block=blocks[l])

    bar.reset(total=n)
    batches = batches_of(ids, n, bld.batch_size, config.data.seq_len, first=shard.first)
    run_pass(session.teacher, batches, visit, after_batch=lambda: bar.update(min(bld.batch_size, n - bar.n)))
    collector.count(n * config.data.seq_len)
    bar.close()

    # Initialize every variant from the parent, save it and score it, in rounds that fit the memory limit.
    params = {v.key: variant_params(v, session.parent_config)  # every layer's: rank 0 logs all ranks' rounds
              for l in range(len(session.layer_variants)) for v in session.variants(l)}
    table = rounds.agree_rounds(session, [(v.key, params[v.key]) for v in session.owned_variants()], max_memory_bytes,
                                bytes_per_param=rounds.BUILD_BYTES_PER_PARAM, stage="build")  # [rank][round]: keys
    info = rounds.summary(table, params, bytes_per_param=rounds.BUILD_BYTES_PER_PARAM)
    vids, vn = load_ids(session, "validation", bld.val_sequences)
    val: dict[str, float] = {}
    for k, keys in enumerate(table[shard.rank]):
        label = f"{k + 1}/{len(info)}"
        if shard.first:
            log.info("build round %s: %d variants, %s on the fullest rank", label, info[k]["variants"],
                     rounds.format_bytes(info[k]["bytes"]))
        val.update(_build_round(session, set(keys), collector.stats, tmp, vids, vn, label=label, progress=progress))
        rounds.release(shard.device)
    rows = [_row(v, session, val[v.key]) for v in session.owned_variants()]
    gathered = shard.gather(rows)
    if shard.first:
        _write_rest(session, tmp, pd.DataFrame([r for part in gathered for r in part], columns=INDEX_COLUMNS),
                    seconds=time.perf_counter() - t0, calib_tokens=collector.stats.tokens,
                    rounds_info={"count": len(info), "sizes": [r["sizes"] for r in info]})
        replace_directory(tmp, out)
        log.info("library of %d variants written to %s", sum(map(len, gathered)), out)


def _build_round(session: Session, keys: set[str], stats: CalibrationStats, tmp: Path, vids: torch.Tensor | None,
                 vn: int, *, label: str, progress: bool) -> dict[str, float]:
    """Initialize and save this rank's variants in ``keys``; return the validation NMSE of every one
    (and 0 for the parent's own sub-blocks). One validation pass: every rank takes part."""
    show = progress and session.shard.first
    modules = {}
    blocks = session.teacher.blocks
    for v in tqdm([v for v in session.owned_variants() if v.key in keys], desc=f"initialize {label}",
                  unit="variant", disable=not show):
        m = initialize(session.new_module(v), blocks[v.layer], v, stats)
        modules[v.key] = m
        if v.kind != "no_op":
            write_state(m.state_dict(), tmp / "init" / v.filename)
    bs = session.config.bld.batch_size
    vbar = tqdm(desc=f"validate {label}", total=-(-vn // bs), unit="batch", disable=not show)
    val = validate(session, modules, vids, vn, progress=vbar)
    vbar.close()
    return val


def _row(v, session: Session, nmse: float) -> dict[str, Any]:
    return {"layer": v.layer, "subblock": v.subblock, "variant": v.label, "kind": v.kind, "is_parent": v.is_parent,
            "trained": False, "params": variant_params(v, session.parent_config), "init_val_nmse": nmse,
            "final_val_nmse": nmse, "file": f"init/{v.filename}" if v.kind != "no_op" else ""}


def _write_rest(session: Session, tmp: Path, table: pd.DataFrame, *, seconds: float, calib_tokens: int,
                rounds_info: dict[str, Any]) -> None:
    import yaml

    cfg = session.config
    atomic_write_text(tmp / INDEX, table.to_csv(index=False))
    atomic_write_text(tmp / "config.yaml", "# puzzle library build ... --config config.yaml\n"
                      + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    pc = {k: v for k, v in session.parent_config.to_dict().items()
          if k not in ("model_type", "transformers_version", "architectures", "num_hidden_layers", "dtype")}
    atomic_write_json(tmp / "parent_config.json", pc)
    write_state(session.shared, tmp / "shared.safetensors")  # embedding and head, for assembling children
    copy_tokenizer_files(session.source.directory, tmp)
    atomic_write_json(tmp / MANIFEST, {
        "stage": STAGE, "status": "initialized", "puzzle_version": __version__,
        "parent": {"source": session.source.name, "directory": str(session.source.directory.resolve()),
                   "fingerprint": parent_fingerprint(session.source)},
        "config": cfg.to_dict(), "config_sha256": cfg.sha256(),
        "build": {"seconds": round(seconds, 2), "calibration_tokens": calib_tokens, "world_size": session.shard.world,
                  "device": str(session.shard.device), "torch": torch.__version__, "rounds": rounds_info},
        "bld": None,
    })

