"""The efficiency fit recovers known factors, and calibration files round-trip or fail loudly."""

from __future__ import annotations

import numpy as np
import pytest

from puzzle.errors import CorruptArtifactError
from puzzle.profiler.counts import ModelShape, block_ops
from puzzle.profiler.fit import fit_efficiency, load_calibration, relative_errors, save_calibration
from puzzle.profiler.hardware import Accelerator, Efficiency, Target, parse_target
from puzzle.profiler.roofline import ops_ms
from puzzle.profiler.scenario import parse_scenario
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

SHAPE = ModelShape(576, 9, 64, 49152)
SCENARIOS = [parse_scenario(s) for s in ("p=prefill:batch=1,prompt=256", "d1=decode:batch=1,context=1024",
                                         "d8=decode:batch=8,context=1024")]
BLOCKS = ([BlockConfig(attention=a, ffn=FFNConfig.no_op())
           for a in (AttentionConfig.gqa(3), AttentionConfig.gqa(1), AttentionConfig.linear())]
          + [BlockConfig(attention=AttentionConfig.no_op(), ffn=f)
             for f in (*(FFNConfig.swiglu(m) for m in (1536, 1024, 512, 256)), FFNConfig.linear())])
CPU = Accelerator(name="cpu", tflops={"fp32": 0.19}, memory_gb=16, bandwidth_tbs=0.05,
                  efficiency=Efficiency(compute={"fp32": 1.0}, memory=1.0, kernel_overhead_us=2.0))


class Rec:
    def __init__(self, ops, ms):
        self.ops, self.measured_ms = ops, ms


def synthetic(target: Target, truth: Efficiency, dtype: str, noise: float = 0.03, *, shape: ModelShape = SHAPE,
              scenarios=SCENARIOS) -> list[Rec]:
    """Block times the model itself predicts with ``truth``, each off by up to +-noise."""
    rng = np.random.default_rng(0)
    true_target = target.with_efficiency(truth)
    out = []
    for sc in scenarios:
        for b in BLOCKS:
            ops = block_ops(shape, b, sc, dtype=dtype)
            out.append(Rec(ops, ops_ms(ops, true_target) * (1 + rng.uniform(-noise, noise))))
    return out


def test_fit_recovers_cpu_factors():
    truth = Efficiency(compute={"fp32": 0.62}, memory=0.71, kernel_overhead_us=6.5)
    target = Target(accelerator=CPU, dtype="fp32")
    fitted = fit_efficiency(synthetic(target, truth, "fp32"), target)
    assert fitted.compute["fp32"] == pytest.approx(0.62, rel=0.05)
    assert fitted.memory == pytest.approx(0.71, rel=0.05)
    assert fitted.kernel_overhead_us == pytest.approx(6.5, rel=0.10)
    errs = relative_errors(synthetic(target, truth, "fp32"), target.with_efficiency(fitted))
    assert np.abs(errs).max() < 0.05


def test_decode_only_measurements_keep_the_base_compute_fraction():
    """Memory-bound points cannot tell the compute fraction: the fit keeps the base value (it used to
    drift to whatever the grid liked, then mispredicted prefill several-fold)."""
    truth = Efficiency(compute={"fp32": 0.62}, memory=0.71, kernel_overhead_us=6.5)
    target = Target(accelerator=CPU, dtype="fp32")
    recs = synthetic(target, truth, "fp32", scenarios=SCENARIOS[1:2])  # decode, batch 1: all memory-bound
    fitted = fit_efficiency(recs, target)
    assert fitted.compute["fp32"] == pytest.approx(1.0)  # CPU's base efficiency, untouched
    assert fitted.memory == pytest.approx(0.71, rel=0.1)
    with_prefill = fit_efficiency(synthetic(target, truth, "fp32"), target)
    assert with_prefill.compute["fp32"] == pytest.approx(0.62, rel=0.05)


def test_fit_recovers_serial_compute_and_memory():
    """A CPU whose GEMMs do not overlap compute with memory traffic (overlap 0.1)."""
    truth = Efficiency(compute={"fp32": 0.9}, memory=0.45, overlap=0.1, kernel_overhead_us=6.0)
    target = Target(accelerator=CPU, dtype="fp32")
    recs = synthetic(target, truth, "fp32")
    fitted = fit_efficiency(recs, target)
    assert fitted.overlap == pytest.approx(0.1, abs=0.1)
    assert fitted.memory == pytest.approx(0.45, rel=0.05)
    assert np.abs(relative_errors(recs, target.with_efficiency(fitted))).max() < 0.05
    roofline_only = fit_efficiency(recs, target, fit_overlap=False)
    assert roofline_only.overlap == 1.0


def test_fit_is_exact_without_noise_and_deterministic():
    truth = Efficiency(compute={"fp32": 0.4}, memory=1.3, kernel_overhead_us=3.0)
    target = Target(accelerator=CPU, dtype="fp32")
    recs = synthetic(target, truth, "fp32", noise=0.0)
    a, b = fit_efficiency(recs, target), fit_efficiency(recs, target)
    assert a == b
    assert np.abs(relative_errors(recs, target.with_efficiency(a))).max() < 0.01


def test_fit_two_dtypes_fp8_gpu():
    """fp8 GEMMs and bf16 attention each get their own compute fraction; other fields are kept."""
    target = parse_target("1xH100", dtype="fp8")
    truth = target.accelerator.efficiency.replace(compute={"bf16": 0.5, "fp8": 0.3}, memory=0.8,
                                                  kernel_overhead_us=4.0)
    # A Llama-8B-wide layer: long prefills make the fp8 GEMMs compute-bound, decodes memory-bound.
    shape = ModelShape(4096, 32, 128, 128256)
    scenarios = [parse_scenario(s) for s in ("prefill:batch=8,prompt=4096", "prefill:batch=1,prompt=512",
                                             "decode:batch=64,context=4096", "decode:batch=1,context=1024")]
    recs = synthetic(target, truth, "fp8", shape=shape, scenarios=scenarios)
    fitted = fit_efficiency(recs, target)
    assert fitted.compute["fp8"] == pytest.approx(0.3, rel=0.05)
    assert fitted.memory == pytest.approx(0.8, rel=0.05)
    assert np.abs(relative_errors(recs, target.with_efficiency(fitted))).max() < 0.05
    assert fitted.link == truth.link and fitted.allreduce_latency_us == truth.allreduce_latency_us


def test_calibration_round_trip(tmp_path):
    eff = Efficiency(compute={"fp32": 0.5}, memory=0.9, kernel_overhead_us=7.0, link=1.0)
    path = save_calibration(tmp_path / "cal.json", "cpu:fp32", "fp-123", eff, [{"measured_ms": 1.0}],
                            peaks={"tflops": {"fp32": 0.19}, "bandwidth_tbs": 0.05})
    cal = load_calibration(path)
    assert cal.efficiency == eff and cal.target == "cpu:fp32" and cal.fingerprint == "fp-123"
    assert cal.peaks["bandwidth_tbs"] == 0.05 and cal.records == [{"measured_ms": 1.0}]


@pytest.mark.parametrize("text", ["{not json", '{"format": "puzzle-calibration", "version": 99}',
                                  '{"format": "puzzle-calibration", "version": 1, "target": "cpu"}'])
def test_corrupt_calibration_names_the_file(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(CorruptArtifactError, match="broken.json"):
        load_calibration(path)
