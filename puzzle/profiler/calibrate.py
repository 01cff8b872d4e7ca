"""``puzzle profile --measure / --calibration``: time the variants here, fit, save, and cost with the fit.

Measuring times every distinct attention variant (FFN a no-op) and FFN variant (attention a
no-op) of the candidates in every scenario on the present device (the cost model is a sum over
ops, so sub-blocks are enough to fit it), fits the efficiency factors
(:func:`puzzle.profiler.fit.fit_efficiency`) and saves them as this device's calibration, which
later runs (and ``--target cpu`` without ``--measure``) reuse.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from puzzle.errors import UnknownTargetError
from puzzle.profiler.counts import ModelShape
from puzzle.profiler.devices import Target
from puzzle.profiler.scenario import Scenario
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

log = logging.getLogger(__name__)


def sub_blocks(candidates: Sequence[Sequence[BlockConfig]]) -> list[BlockConfig]:
    """Each distinct attention and FFN variant once, with the other half a no-op (first-seen order)."""
    atts = list(dict.fromkeys(b.attention for layer in candidates for b in layer if b.attention.kind != "no_op"))
    ffns = list(dict.fromkeys(b.ffn for layer in candidates for b in layer if b.ffn.kind != "no_op"))
    return ([BlockConfig(attention=a, ffn=FFNConfig.no_op()) for a in atts]
            + [BlockConfig(attention=AttentionConfig.no_op(), ffn=f) for f in ffns])


def device_fingerprint(target: Target) -> str:
    """This CPU's fingerprint, or ``<gpu name>-torch<version>`` for a GPU target."""
    if target.is_cpu:
        from puzzle.profiler.cpu import fingerprint

        return fingerprint()
    import re

    import torch

    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"{name}-torch{torch.__version__.split('+')[0]}-{target.dtype}"


def _with_peaks(target: Target, peaks: dict) -> Target:
    if not peaks:
        return target
    acc = dataclasses.replace(target.accelerator, tflops=dict(peaks.get("tflops") or target.accelerator.tflops),
                              bandwidth_tbs=float(peaks.get("bandwidth_tbs") or target.accelerator.bandwidth_tbs))
    return dataclasses.replace(target, accelerator=acc)


def calibrate_target(target: Target, shape: ModelShape, candidates: Sequence[Sequence[BlockConfig]],
                     scenarios: Sequence[Scenario], *, measure: bool, calibration: str | Path | None,
                     **measure_kwargs: Any) -> Target:
    """``target`` with fitted efficiencies: measured now (``measure``) or read from ``calibration``.

    ``measure_kwargs`` go to :func:`puzzle.profiler.measure.measure_blocks` (repeats, warmup, ...).
    """
    from puzzle.profiler.fit import default_calibration_path, fit_efficiency, load_calibration, save_calibration

    if not measure:
        cal = load_calibration(calibration)
        log.info("using calibration %s (%s, fitted on %d measurements)", calibration, cal.target, len(cal.records))
        return _with_peaks(target, cal.peaks).with_efficiency(cal.efficiency)
    import torch

    from puzzle.profiler.measure import measure_blocks

    if target.is_cpu:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
        log.warning("measuring on %s for target %s: the fit assumes they are the same kind of GPU",
                    torch.cuda.get_device_name(), target.name)
    else:
        raise UnknownTargetError(f"--measure times blocks on the present device, but {target.name} is a GPU target "
                                 "and no CUDA GPU is present; use --target cpu, or drop --measure")
    one_rank = dataclasses.replace(target, count=1, tensor_parallel=1)
    pairs = [(b, sc) for sc in scenarios for b in sub_blocks(candidates)]
    records = measure_blocks(shape, pairs, device=device, dtype=target.dtype, desc="measuring variants",
                             **measure_kwargs)
    efficiency = fit_efficiency(records, one_rank)
    fp = device_fingerprint(target)
    path = Path(calibration) if calibration else default_calibration_path(fp)
    acc = target.accelerator
    save_calibration(path, target.name, fp, efficiency, records,
                     peaks={"tflops": dict(acc.tflops), "bandwidth_tbs": acc.bandwidth_tbs})
    log.info("saved calibration %s: %s", path, efficiency)
    return target.with_efficiency(efficiency)
