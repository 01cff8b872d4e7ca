"""Fit the roofline model's efficiency factors to measured block times, and keep the fit on disk.

The model (:mod:`puzzle.profiler.roofline`) prices one op as

    max(tc, tm) + (1 - v) min(tc, tm) + kernels * o,   tc = FLOPs / (peak[d] * c[d]),  tm = bytes / (bandwidth * m)

with one compute fraction ``c[d]`` per dtype the ops use, one memory fraction ``m``, the overlap
``v`` of compute and memory traffic and one per-kernel overhead ``o``. :func:`fit_efficiency`
minimizes the mean squared *relative* error over the measured blocks: for fixed ``(c, m, v)`` a
block's time is linear in ``o``, so ``o`` has a closed form (weighted least squares, clamped at
0); ``(c, m, v)`` are searched on a grid (log-spaced for the fractions), then on finer grids
around the best point. Deterministic, numpy only.

A calibration file (``cache_root()/calibration/<fingerprint>.json`` by default) holds the fitted
:class:`~puzzle.profiler.devices.Efficiency`, the peaks it is relative to and the measurements.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from puzzle.errors import CorruptArtifactError
from puzzle.io import atomic_write_json
from puzzle.profiler.counts import Op
from puzzle.profiler.devices import Efficiency, Target
from puzzle.profiler.roofline import ops_ms

log = logging.getLogger(__name__)

CALIBRATION_VERSION = 1
GRID_RANGE = (1 / 64, 4.0)
"""Fractions searched (above 1: a working set that stays in cache beats the measured DRAM copy)."""


class Timed(Protocol):
    """What the fit needs of a measurement (:class:`puzzle.profiler.measure.Measurement` is one)."""

    measured_ms: float
    ops: Sequence[Op]


@dataclass(frozen=True)
class _Design:
    """The measurements as arrays: op k belongs to record ``owner[k]``."""

    flops: np.ndarray  # (K,)
    bytes: np.ndarray  # (K,)
    kernels: np.ndarray  # (K,)
    dtype_idx: np.ndarray  # (K,) index into dtypes, -1 for ops without FLOPs
    peak: np.ndarray  # (K,) peak FLOP/s of the op's dtype
    owner: np.ndarray  # (K,)
    y: np.ndarray  # (N,) measured seconds
    dtypes: tuple[str, ...]


def _design(records: Sequence[Timed], target: Target) -> _Design:
    acc = target.accelerator
    ops = [(i, op) for i, r in enumerate(records) for op in r.ops if not op.allreduce_bytes]
    # The dtype whose compute fraction applies, as roofline.op_seconds picks it.
    eff_dtype = [op.dtype if op.dtype in acc.tflops else target.dtype for _, op in ops]
    dtypes = tuple(sorted({d for d, (_, op) in zip(eff_dtype, ops) if op.flops}))
    return _Design(
        flops=np.array([op.flops for _, op in ops], dtype=float),
        bytes=np.array([op.bytes for _, op in ops], dtype=float),
        kernels=np.array([op.kernels for _, op in ops], dtype=float),
        dtype_idx=np.array([dtypes.index(d) if op.flops else -1 for d, (_, op) in zip(eff_dtype, ops)], dtype=int),
        peak=np.array([acc.peak_flops(d) for d in eff_dtype], dtype=float),
        owner=np.array([i for i, _ in ops], dtype=int),
        y=np.array([r.measured_ms * 1e-3 for r in records], dtype=float),
        dtypes=dtypes,
    )


def _evaluate(d: _Design, params: np.ndarray, bandwidth: float) -> tuple[np.ndarray, np.ndarray]:
    """For G grid points ``params`` (G, D + 2) = (compute per dtype..., memory, overlap):
    mean squared relative error (G,) and the best per-kernel overhead (G,) in seconds."""
    n, compute, memory, overlap = len(d.y), params[:, :-2], params[:, -2], params[:, -1]
    c = np.where(d.dtype_idx >= 0, compute[:, np.maximum(d.dtype_idx, 0)], 1.0)  # (G, K)
    t_compute = d.flops / (d.peak * c)  # (G, K)
    t_memory = d.bytes[None] / (bandwidth * memory[:, None])  # (G, K)
    t_op = np.maximum(t_compute, t_memory) + (1.0 - overlap[:, None]) * np.minimum(t_compute, t_memory)
    owner = np.zeros((len(d.owner), n))
    owner[np.arange(len(d.owner)), d.owner] = 1.0  # (K, N)
    roof = t_op @ owner  # (G, N) seconds per record before kernel overheads
    kern = np.bincount(d.owner, weights=d.kernels, minlength=n)  # (N,)
    # Relative residual r = (roof + kern o - y) / y is linear in o: least squares, then o >= 0.
    u, resid = kern / d.y, (d.y - roof) / d.y  # (N,), (G, N)
    o = np.clip(resid @ u / max(float(u @ u), 1e-30), 0.0, None) if u.any() else np.zeros(len(memory))
    loss = ((roof + kern * o[:, None] - d.y) / d.y) ** 2
    return loss.mean(axis=1), o


def _compute_bound_somewhere(d: _Design, i: int, target: Target, base: Efficiency) -> bool:
    """Whether, in some record, the ops of dtype ``d.dtypes[i]`` take longer in compute than in memory
    traffic at ``base``'s fractions (else the data cannot pin that compute fraction down)."""
    n, mine = len(d.y), d.dtype_idx == i
    t_compute = np.where(mine, d.flops / (d.peak * base.compute.get(d.dtypes[i], 1.0)), 0.0)
    t_memory = np.where(mine, d.bytes / (target.accelerator.bandwidth * base.memory), 0.0)
    compute = np.bincount(d.owner, weights=t_compute, minlength=n)  # (N,)
    memory = np.bincount(d.owner, weights=t_memory, minlength=n)  # (N,)
    return bool((compute[compute > 0] >= memory[compute > 0]).any())


def _grid(center: np.ndarray, half_width: np.ndarray, lo: np.ndarray, hi: np.ndarray, points: int) -> np.ndarray:
    """``points`` values per axis around ``center`` (in search coordinates), clipped to [lo, hi]; all combinations."""
    axes = [np.unique(np.clip(np.linspace(c - w, c + w, points), a, b)) for c, w, a, b in zip(center, half_width, lo, hi)]
    return np.array(list(itertools.product(*axes)))


def fit_efficiency(records: Sequence[Timed], target: Target, *, base: Efficiency | None = None,
                   fit_overlap: bool = True) -> Efficiency:
    """The :class:`Efficiency` whose predictions best match ``records`` on ``target`` (relative error).

    Fits a compute fraction for each dtype whose ops have FLOPs, the memory fraction, the
    per-kernel overhead and (``fit_overlap``) the compute / memory overlap; other fields come from
    ``base`` (default: the target's current efficiency).
    """
    if not records:
        raise ValueError("no measurements to fit")
    base = base or target.accelerator.efficiency
    d = _design(records, target)
    # Search coordinates: log of each compute fraction and of the memory fraction, overlap as is.
    lo = np.array([np.log(GRID_RANGE[0])] * (len(d.dtypes) + 1) + [0.0 if fit_overlap else base.overlap])
    hi = np.array([np.log(GRID_RANGE[1])] * (len(d.dtypes) + 1) + [1.0 if fit_overlap else base.overlap])
    for i, dt in enumerate(d.dtypes):
        if not _compute_bound_somewhere(d, i, target, base):
            # Only memory-bound ops of this dtype (decode points, say): the data cannot tell its compute
            # fraction, and a free fit would drift to any value and mispredict prefill. Keep the base one.
            lo[i] = hi[i] = np.log(base.compute.get(dt, 1.0))
            log.info("no compute-bound %s measurement: keeping its compute fraction at %.3g", dt, np.exp(lo[i]))
    points = {2: 41, 3: 25}.get(len(lo), 13)
    center, half_width, overhead = (lo + hi) / 2, (hi - lo) / 2, 0.0
    for _ in range(5):  # the whole box, then boxes two steps of the previous grid wide around the best
        grid = _grid(center, half_width, lo, hi, points)
        params = np.concatenate([np.exp(grid[:, :-1]), grid[:, -1:]], axis=1)
        loss, o = _evaluate(d, params, target.accelerator.bandwidth)
        k = int(np.argmin(loss))  # first minimum: ties resolve the same way every run
        center, overhead = grid[k], float(o[k])
        half_width = 2 * (2 * half_width / (points - 1))
    best = np.concatenate([np.exp(center[:-1]), center[-1:]])
    compute = {**dict(base.compute), **{dt: float(best[i]) for i, dt in enumerate(d.dtypes)}}
    fitted = base.replace(compute=compute, memory=float(best[-2]), overlap=float(best[-1]),
                          kernel_overhead_us=overhead * 1e6)
    log.info("fitted %s on %d measurements: %s", target.name, len(records), fitted)
    return fitted


def relative_errors(records: Sequence[Timed], target: Target) -> np.ndarray:
    """(predicted - measured) / measured per record, priced by roofline with ``target``'s efficiency."""
    return np.array([ops_ms(r.ops, target) / r.measured_ms - 1.0 for r in records])


# ------------------------------------------------------------------------------------------ files


@dataclass(frozen=True)
class Calibration:
    """A fitted efficiency, what it was fitted on, and the peaks it is relative to."""

    target: str
    fingerprint: str
    efficiency: Efficiency
    peaks: dict[str, Any]
    records: list[dict[str, Any]]


def default_calibration_path(fingerprint: str) -> Path:
    from puzzle.parents.embedded import cache_root

    return cache_root() / "calibration" / f"{fingerprint}.json"


def save_calibration(path: str | Path, target_name: str, fingerprint: str, efficiency: Efficiency,
                     records: Sequence[Any], *, peaks: Mapping[str, Any] | None = None) -> Path:
    """Write a calibration JSON atomically; ``records`` are measurements (``to_dict``) or dicts."""
    path = Path(path)
    atomic_write_json(path, {
        "format": "puzzle-calibration", "version": CALIBRATION_VERSION, "target": target_name,
        "fingerprint": fingerprint, "efficiency": efficiency.to_dict(), "peaks": dict(peaks or {}),
        "records": [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in records],
    })
    return path


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration written by :func:`save_calibration`; :class:`CorruptArtifactError` if unreadable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if data.get("format") != "puzzle-calibration" or data.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}, "
                             f"expected puzzle-calibration version {CALIBRATION_VERSION}")
        return Calibration(target=str(data["target"]), fingerprint=str(data["fingerprint"]),
                           efficiency=Efficiency.from_dict(data["efficiency"]), peaks=dict(data.get("peaks") or {}),
                           records=list(data.get("records") or []))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise CorruptArtifactError(f"calibration file {path} is unreadable ({type(e).__name__}: {e}); "
                                   "delete it and measure again (puzzle profile --measure)") from None
