"""This machine as a target: its GEMM FLOP/s and memory bandwidth, measured once and cached.

The ``cpu`` target has no datasheet: :func:`measure_cpu_peaks` times a large square matmul (fp32,
and bf16 where the CPU has fast bf16 units) and a copy of a tensor far larger than the caches,
at torch's current thread count, plus the eager runtime's cost per kernel (a decoder block too
small to compute anything, divided by its kernel count).
:func:`cpu_accelerator` returns an :class:`~puzzle.profiler.devices.Accelerator` whose peaks are
those measurements, so efficiencies near 1.0 are the honest default; a calibration fitted by
``puzzle profile --target cpu --measure`` (:mod:`puzzle.profiler.fit`) replaces them when one
exists for this machine's fingerprint (CPU model, thread count, torch version).

Measurements live in ``cache_root()/hardware/<fingerprint>.json`` (``PUZZLE_CACHE_DIR`` moves
it), calibrations in ``cache_root()/calibration/<fingerprint>.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from puzzle.errors import CorruptArtifactError
from puzzle.profiler.devices import CPU, Accelerator, Efficiency

log = logging.getLogger(__name__)

PEAKS_VERSION = 2
_MEMO: dict[tuple[str, str], Accelerator] = {}  # (cache file, calibration mtime) -> accelerator


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def fingerprint(threads: int | None = None) -> str:
    """``amd-epyc-2t-torch2.13.0-1a2b3c4d``: CPU model, torch threads (default: this process's), torch version
    (+ a hash of all three)."""
    import torch

    model, version = _cpu_model(), torch.__version__
    threads = threads or torch.get_num_threads()
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40]
    digest = hashlib.sha256(f"{model}|{threads}|{version}|{platform.machine()}".encode()).hexdigest()[:8]
    return f"{slug}-{threads}t-torch{version.split('+')[0]}-{digest}"


def hardware_dir() -> Path:
    from puzzle.parents.embedded import cache_root

    return cache_root() / "hardware"


def _best_seconds(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> float:
    """Fastest of ``repeats`` runs: a peak is what the hardware can do, and interference only slows."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _gemm_flops(dtype: Any, n: int, repeats: int) -> float:
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return 2.0 * n**3 / _best_seconds(lambda: torch.mm(a, b, out=out), repeats=repeats, warmup=2)


def _eager_overhead_us(quick: bool) -> float:
    """Time per counted kernel of a decoder block too small to compute or move anything: what the
    eager runtime spends per kernel (dispatch, Python, the views and reshapes between kernels)."""
    from puzzle.profiler.counts import ModelShape, block_ops
    from puzzle.profiler.measure import measure_block_ms
    from puzzle.profiler.scenario import Scenario
    from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

    shape = ModelShape(hidden_size=16, num_attention_heads=2, head_dim=8, vocab_size=16)
    block = BlockConfig(attention=AttentionConfig.gqa(1), ffn=FFNConfig.swiglu(16))
    sc = Scenario(name="decode", phase="decode", batch=1, length=8)
    ms = measure_block_ms(shape, block, sc, repeats=5 if quick else 20, warmup=3, stream_bytes=0, statistic="min")
    return 1e3 * ms / sum(op.kernels for op in block_ops(shape, block, sc, dtype="fp32"))


def measure_cpu_peaks(*, quick: bool = False) -> dict[str, Any]:
    """Time this CPU at torch's thread count: GEMM FLOP/s, copy bandwidth, eager cost per kernel.

    Each figure is the fastest of a few runs after warm-up: a peak is what the hardware can do,
    and other processes on the machine only ever slow a run down.

    Returns ``{"fp32_flops", "bf16_flops" (absent if bf16 GEMMs are under a quarter of fp32),
    "bandwidth" (bytes/s, reads + writes), "kernel_overhead_us", "threads", "cpu", "torch"}``.
    """
    import torch

    n, repeats, mib = (1024, 3, 128) if quick else (2048, 5, 256)
    with torch.inference_mode():
        fp32 = _gemm_flops(torch.float32, n, repeats)
        # Emulated bf16 (no AVX512-BF16 / AMX) runs a large GEMM for minutes: a small probe first, and the
        # full measurement only where bf16 can be a serving dtype at all (the test below, with slack).
        probe = _gemm_flops(torch.bfloat16, 512, 1)
        bf16 = _gemm_flops(torch.bfloat16, n, repeats) if probe >= fp32 / 16 else probe
        src = torch.ones(mib * 2**20 // 4)  # fp32; well beyond any last-level cache
        dst = torch.empty_like(src)
        copy_s = _best_seconds(lambda: dst.copy_(src), repeats=repeats, warmup=2)
    peaks: dict[str, Any] = {"fp32_flops": fp32, "bandwidth": 2.0 * src.numel() * 4 / copy_s,
                             "kernel_overhead_us": _eager_overhead_us(quick), "threads": torch.get_num_threads(),
                             "cpu": _cpu_model(), "torch": torch.__version__}
    if bf16 >= fp32 / 4:  # emulated bf16 (no AVX512-BF16 / AMX) is far slower than fp32: not a serving dtype
        peaks["bf16_flops"] = bf16
    log.info("cpu peaks: %.1f GFLOP/s fp32, %.1f GB/s, %.2f us per op", fp32 / 1e9, peaks["bandwidth"] / 1e9,
             peaks["kernel_overhead_us"])
    return peaks


def total_ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


def _load_peaks(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != PEAKS_VERSION:
            return None
        float(data["fp32_flops"]), float(data["bandwidth"])
        return data
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        log.warning("ignoring unreadable CPU peaks cache %s; measuring again", path)
        return None


def cpu_peaks(*, refresh: bool = False) -> dict[str, Any]:
    """This machine's peaks from the cache, measured (and cached) the first time."""
    from puzzle.io import atomic_write_json

    fp = fingerprint()
    path = hardware_dir() / f"{fp}.json"
    peaks = None if refresh else _load_peaks(path)
    if peaks is None:
        log.info("measuring this CPU's peaks once (cached in %s)", path)
        peaks = {"version": PEAKS_VERSION, "fingerprint": fp, **measure_cpu_peaks()}
        atomic_write_json(path, peaks)
    return peaks


def cached_peaks(threads: int) -> dict[str, Any] | None:
    """The peaks measured on this CPU at ``threads`` torch threads, or None when they never were."""
    return _load_peaks(hardware_dir() / f"{fingerprint(threads)}.json")


_FP32_MEMO: dict[str, float] = {}


def fp32_flops() -> float:
    """This CPU's fp32 GEMM FLOP/s at torch's thread count, for planning: the cached peaks when they
    were measured, else a probe of a fraction of a second (not cached), never the minutes-long full run."""
    peaks = _load_peaks(hardware_dir() / f"{fingerprint()}.json")
    if peaks is not None:
        return float(peaks["fp32_flops"])
    if "probe" not in _FP32_MEMO:
        import torch

        with torch.inference_mode():
            _FP32_MEMO["probe"] = _gemm_flops(torch.float32, 768, 3)
    return _FP32_MEMO["probe"]


def default_cpu_efficiency(peaks: dict[str, Any]) -> Efficiency:
    """Fractions of the *measured* peaks: 1.0 each, plus the measured cost of one eager op."""
    compute = {"fp32": 1.0, **({"bf16": 1.0} if "bf16_flops" in peaks else {})}
    return Efficiency(compute=compute, memory=1.0, kernel_overhead_us=float(peaks["kernel_overhead_us"]),
                      link=1.0, allreduce_latency_us=0.0)


def cpu_accelerator(*, refresh: bool = False) -> Accelerator:
    """This CPU as an :class:`Accelerator` (measured once per fingerprint, then read from the cache).

    Uses the fitted calibration ``cache_root()/calibration/<fingerprint>.json`` when there is one, else
    :func:`default_cpu_efficiency`.
    """
    fp = fingerprint()
    from puzzle.profiler.fit import default_calibration_path, load_calibration

    cal_path = default_calibration_path(fp)
    cal_stamp = str(cal_path.stat().st_mtime_ns) if cal_path.is_file() else ""
    key = (str(hardware_dir() / f"{fp}.json"), cal_stamp)
    if not refresh and key in _MEMO:
        return _MEMO[key]
    peaks = cpu_peaks(refresh=refresh)
    tflops = {"fp32": peaks["fp32_flops"] / 1e12}
    if "bf16_flops" in peaks:
        tflops["bf16"] = peaks["bf16_flops"] / 1e12
    bandwidth_tbs, efficiency = peaks["bandwidth"] / 1e12, default_cpu_efficiency(peaks)
    if cal_stamp:
        try:
            cal = load_calibration(cal_path)
            efficiency = cal.efficiency
            # The fitted fractions are relative to the peaks they were fitted with.
            tflops = dict(cal.peaks.get("tflops") or tflops)
            bandwidth_tbs = float(cal.peaks.get("bandwidth_tbs") or bandwidth_tbs)
        except CorruptArtifactError as e:
            log.warning("%s; using the uncalibrated CPU efficiencies", e)
    acc = Accelerator(name=CPU, tflops=tflops, memory_gb=total_ram_gb(), bandwidth_tbs=bandwidth_tbs,
                      link_gbs=0.0, efficiency=efficiency)
    _MEMO[key] = acc
    return acc
