"""Hardware targets: ``COUNTxNAME`` strings, dtypes, datasheet peaks and their error messages."""

from __future__ import annotations

import importlib.util

import pytest

from puzzle.errors import PuzzleError, UnknownTargetError
from puzzle.profiler import devices, hardware
from puzzle.profiler.counts import ModelShape
from puzzle.profiler.deployment import choose_tensor_parallel
from puzzle.profiler.hardware import (ACCELERATORS, ALIASES, DEFAULT_TARGET, Accelerator, Efficiency, Target,
                                      known_targets, parse_target)
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

EVERY_KNOWN_NAME = ["cpu", "A100-80GB", "H100-SXM", "H200", "B100", "B200", "L40S",
                    "A100", "A100-SXM", "H100", "H100-80GB"]


@pytest.mark.parametrize(
    ("text", "count", "accelerator"),
    [
        ("8xH100", 8, "H100-SXM"),
        ("1xH200", 1, "H200"),
        ("4xB200", 4, "B200"),
        ("2xL40S", 2, "L40S"),
        ("A100", 1, "A100-80GB"),  # no count: one device
        ("8xh100", 8, "H100-SXM"),  # case-insensitive
        ("8XH100", 8, "H100-SXM"),
        ("2*b100", 2, "B100"),
        (" 4 x h200 ", 4, "H200"),
        ("1xH100-SXM", 1, "H100-SXM"),
        ("h100-80gb", 1, "H100-SXM"),
        ("2xa100-sxm", 2, "A100-80GB"),
    ],
)
def test_parse_target(text, count, accelerator):
    target = parse_target(text)
    assert target.count == target.tp == count
    assert target.accelerator.name == accelerator
    assert target.dtype == "bf16"
    assert not target.is_cpu
    assert target.name == f"{count}x{accelerator}:bf16"


def test_fp8_on_h100():
    target = parse_target("8xH100", dtype="fp8")
    assert (target.tp, target.dtype, target.name) == (8, "fp8", "8xH100-SXM:fp8")


@pytest.mark.parametrize("text", ["8xH800", "TPU", "1xV100", "xH100", "8xH100x", "x"])
def test_unknown_accelerator_lists_every_known_target(text):
    with pytest.raises(UnknownTargetError) as info:
        parse_target(text)
    message = str(info.value)
    assert "unknown accelerator" in message
    for name in EVERY_KNOWN_NAME:
        assert name in message, f"{name} missing from: {message}"


@pytest.mark.parametrize("text", ["", "8x", "8 H100", "H100 H200", "8xH100:bf16", "-1xH100", "8x8xH100"])
def test_unreadable_target_strings(text):
    with pytest.raises(UnknownTargetError) as info:
        parse_target(text)
    message = str(info.value)
    assert "COUNTxNAME" in message and "8xH100" in message
    assert "H200" in message and "L40S" in message  # the known targets are listed too


def test_zero_devices():
    with pytest.raises(UnknownTargetError, match="device count must be >= 1, got 0"):
        parse_target("0xH100")


def test_unknown_dtype_lists_the_dtypes():
    with pytest.raises(UnknownTargetError) as info:
        parse_target("8xH100", dtype="int4")
    message = str(info.value)
    assert "'int4'" in message
    for dtype in ("bf16", "fp16", "fp32", "fp8"):
        assert dtype in message


def test_a100_has_no_fp8():
    with pytest.raises(UnknownTargetError) as info:
        parse_target("A100", dtype="fp8")
    assert str(info.value) == "A100-80GB does not support fp8; it supports ['bf16']"
    with pytest.raises(UnknownTargetError, match="H100-SXM does not support fp32; it supports"):
        parse_target("8xH100", dtype="fp32")


def test_errors_are_value_errors():
    # The CLI catches PuzzleError; library callers may catch ValueError.
    with pytest.raises(ValueError):
        parse_target("TPU")
    assert issubclass(UnknownTargetError, PuzzleError)


def test_known_targets():
    assert known_targets() == EVERY_KNOWN_NAME
    for alias, canonical in ALIASES.items():
        assert canonical in ACCELERATORS, alias


def test_h100_datasheet_and_calibrated_efficiencies():
    h100 = ACCELERATORS["H100-SXM"]
    # NVIDIA H100 SXM datasheet: 989.4 dense BF16, 1978.9 dense FP8 TFLOP/s, 3.35 TB/s HBM3, 80 GB,
    # NVLink 900 GB/s bidirectional (450 per direction).
    assert h100.peak_flops("bf16") == pytest.approx(989.4e12)
    assert h100.peak_flops("fp8") == pytest.approx(1978.9e12)
    assert h100.bandwidth == pytest.approx(3.35e12)
    assert h100.memory_bytes == pytest.approx(80e9)
    assert h100.link_gbs == 450
    # The default efficiencies are the measured fractions of those peaks (h100_measured.csv).
    eff = h100.efficiency
    assert eff.compute["bf16"] == pytest.approx(787.3 / 989.4, abs=1e-3)
    assert eff.compute["fp8"] == pytest.approx(1421.7 / 1978.9, abs=1e-3)
    assert eff.memory == pytest.approx(2.99 / 3.35, abs=5e-3)  # rounded to 0.89


def test_every_gpu_is_sane():
    for name, acc in ACCELERATORS.items():
        assert acc.name == name
        assert "bf16" in acc.tflops
        if "fp8" in acc.tflops:  # FP8 tensor cores run at twice the BF16 rate
            assert acc.tflops["fp8"] == pytest.approx(2 * acc.tflops["bf16"], rel=0.02)
        assert acc.bandwidth_tbs > 0 and acc.memory_gb > 0 and acc.link_gbs > 0


def test_efficiency_round_trips_and_replaces():
    eff = Efficiency().replace(memory=0.5, compute={"bf16": 0.6})
    assert Efficiency.from_dict(eff.to_dict()) == eff
    target = parse_target("2xH200").with_efficiency(eff)
    assert target.accelerator.efficiency.memory == 0.5
    assert ACCELERATORS["H200"].efficiency.memory == pytest.approx(0.89)  # the registry is untouched


def test_cpu_needs_no_count():
    # Rejected before the machine is measured.
    with pytest.raises(UnknownTargetError, match="the cpu target is this one machine"):
        parse_target("2xcpu")


@pytest.mark.skipif(importlib.util.find_spec("puzzle.profiler.cpu") is None,
                    reason="puzzle.profiler.cpu not written yet")
def test_cpu_target_uses_the_measured_machine(monkeypatch):
    import puzzle.profiler.cpu

    fake = Accelerator(name="cpu", tflops={"fp32": 1.0, "bf16": 0.5}, memory_gb=16, bandwidth_tbs=0.02)
    monkeypatch.setattr(puzzle.profiler.cpu, "cpu_accelerator", lambda *a, **k: fake)
    target = parse_target("CPU")
    assert target.is_cpu and target.accelerator is fake
    assert (target.tp, target.dtype, target.name) == (1, "fp32", "cpu:fp32")
    assert parse_target("cpu", dtype="bf16").dtype == "bf16"


def test_target_checks_its_dtype_directly():
    with pytest.raises(UnknownTargetError, match="does not support fp8"):
        Target(accelerator=ACCELERATORS["A100-80GB"], dtype="fp8")
    with pytest.raises(UnknownTargetError, match=">= 1"):
        Target(accelerator=ACCELERATORS["H100-SXM"], count=0)


def test_the_default_target_is_one_node_of_eight_h100s_whose_tp_the_model_picks():
    assert DEFAULT_TARGET == "8xH100"
    target = parse_target(DEFAULT_TARGET)
    assert (target.count, target.accelerator.name, target.dtype) == (8, "H100-SXM", "bf16")
    # The count is GPUs, not tensor parallelism: SmolLM2-135M (9 heads, 3 KV heads) fits one H100, so it
    # runs at tp 1 and the other seven GPUs serve replicas.
    smol = ModelShape(hidden_size=576, num_attention_heads=9, head_dim=64, vocab_size=49152)
    blocks = [BlockConfig(attention=AttentionConfig.gqa(3), ffn=FFNConfig.swiglu(1536))] * 30
    served = choose_tensor_parallel(target, smol, blocks, batch=8, kv_tokens=1025)
    assert (served.tp, served.replicas, served.name) == (1, 8, "8xH100-SXM:tp1:bf16")


def test_hardware_hands_out_the_data_classes_of_devices():
    # One class each, whichever module a caller names (search stage keys hash Target.to_dict()).
    for name in ("Accelerator", "Efficiency", "Target", "DTYPE_BYTES", "CPU"):
        assert getattr(hardware, name) is getattr(devices, name)
    assert set(hardware.__all__) >= {"DEFAULT_TARGET", "parse_target", "Target", "ACCELERATORS"}
