"""Measured mode: every variant kind times on the CPU, the static decode cache computes the real
block, and the CPU target measures its peaks once per fingerprint. No timing assertions here."""

from __future__ import annotations

import json

import pytest
import torch

from puzzle.profiler import cpu
from puzzle.profiler.counts import ModelShape
from puzzle.profiler.hardware import Efficiency, parse_target
from puzzle.profiler.measure import (StaticKVCache, block_spec, measure_block_ms, measure_blocks,
                                     measure_fixed_ms, runtime_config)
from puzzle.profiler.scenario import parse_scenario
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

TINY = ModelShape(hidden_size=64, num_attention_heads=4, head_dim=16, vocab_size=128)
PREFILL = parse_scenario("prefill:batch=2,prompt=8")
DECODE = parse_scenario("decode:batch=2,context=12")
KINDS = [BlockConfig(attention=a, ffn=f) for a, f in [
    (AttentionConfig.gqa(2), FFNConfig.swiglu(96)), (AttentionConfig.gqa(1), FFNConfig.no_op()),
    (AttentionConfig.linear(), FFNConfig.linear()), (AttentionConfig.no_op(), FFNConfig.swiglu(32)),
    (AttentionConfig.no_op(), FFNConfig.no_op())]]


@pytest.mark.parametrize("sc", [PREFILL, DECODE], ids=["prefill", "decode"])
@pytest.mark.parametrize("block", KINDS, ids=[b.label for b in KINDS])
def test_every_variant_kind_measures_positive(block, sc):
    ms = measure_block_ms(TINY, block, sc, repeats=2, warmup=1, stream_bytes=2**17)
    assert ms > 0


def test_measure_blocks_pairs_with_ops_and_fixed():
    recs = measure_blocks(TINY, [(KINDS[0], DECODE), (KINDS[2], PREFILL)], repeats=1, warmup=0,
                          stream_bytes=0, progress=False)
    assert [r.label for r in recs] == [KINDS[0].label, KINDS[2].label]
    assert all(r.measured_ms > 0 and r.ops for r in recs)
    assert recs[0].to_dict()["scenario"]["phase"] == "decode"
    assert measure_fixed_ms(TINY, DECODE, repeats=1, warmup=0) > 0


def test_static_cache_decode_matches_dynamic_cache():
    """One decode step through the measured path equals the runtime's DynamicCache path."""
    from transformers.cache_utils import DynamicCache

    from puzzle.model.modeling import DecoderBlock, RotaryEmbedding

    torch.manual_seed(0)
    cfg = runtime_config(TINY)
    block = DecoderBlock(cfg, block_spec(KINDS[0]), cache_slot=0).eval()
    B, past, nkv, hd = 2, 12, 2, TINY.head_dim
    k_past, v_past = torch.randn(B, nkv, past, hd), torch.randn(B, nkv, past, hd)  # (B, nkv, S, hd)
    x = torch.randn(B, 1, TINY.hidden_size)
    cos, sin = RotaryEmbedding(cfg.rope_parameters, hd)(torch.full((B, 1), past), x.dtype)
    dynamic = DynamicCache()
    dynamic.update(k_past, v_past, 0)
    static = StaticKVCache(B, nkv, past, hd)
    static.k[:, :, :past], static.v[:, :, :past] = k_past, v_past
    with torch.inference_mode():
        want = block(x, {"cos": cos, "sin": sin, "mask": None, "cache": dynamic})
        got = block(x, {"cos": cos, "sin": sin, "mask": None, "cache": static})
        again = block(x, {"cos": cos, "sin": sin, "mask": None, "cache": static})  # repeats do not grow it
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    assert static.k.shape[2] == past + 1


FAKE_PEAKS = {"fp32_flops": 1e11, "bandwidth": 2e10, "kernel_overhead_us": 3.0, "threads": 1, "cpu": "fake",
              "torch": torch.__version__}


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    """Hermetic cache dir and a counting stand-in for the (slow) peak measurement."""
    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "_MEMO", {})
    calls = []
    monkeypatch.setattr(cpu, "measure_cpu_peaks", lambda **kw: calls.append(kw) or dict(FAKE_PEAKS))
    return calls


def test_cpu_accelerator_measures_once_and_caches(fake_cpu, tmp_path):
    acc = cpu.cpu_accelerator()
    assert acc.name == "cpu" and acc.tflops == {"fp32": 0.1} and acc.bandwidth_tbs == pytest.approx(0.02)
    assert acc.efficiency.compute == {"fp32": 1.0} and acc.efficiency.kernel_overhead_us == 3.0
    assert cpu.cpu_accelerator() is acc
    cpu._MEMO.clear()  # a new process: read back from the JSON cache, still no measurement
    assert cpu.cpu_accelerator() == acc
    assert len(fake_cpu) == 1
    saved = json.loads((tmp_path / "hardware" / f"{cpu.fingerprint()}.json").read_text())
    assert saved["fp32_flops"] == 1e11
    assert parse_target("cpu").accelerator == acc


def test_cpu_accelerator_uses_saved_calibration(fake_cpu):
    from puzzle.profiler.fit import default_calibration_path, save_calibration

    cpu.cpu_accelerator()
    fitted = Efficiency(compute={"fp32": 0.4}, memory=0.6, kernel_overhead_us=9.0, link=1.0)
    save_calibration(default_calibration_path(cpu.fingerprint()), "cpu:fp32", cpu.fingerprint(), fitted, [],
                     peaks={"tflops": {"fp32": 0.2}, "bandwidth_tbs": 0.03})
    acc = cpu.cpu_accelerator()
    assert acc.efficiency == fitted and acc.tflops == {"fp32": 0.2} and acc.bandwidth_tbs == 0.03
    assert len(fake_cpu) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_gpu_measures_bf16_and_fp8(dtype):
    if dtype == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    shape = ModelShape(hidden_size=256, num_attention_heads=4, head_dim=64, vocab_size=512)
    for sc in (parse_scenario("prefill:batch=1,prompt=64"), parse_scenario("decode:batch=16,context=128")):
        assert measure_block_ms(shape, BlockConfig(attention=AttentionConfig.gqa(2), ffn=FFNConfig.swiglu(512)),
                                sc, device="cuda", dtype=dtype, repeats=3, warmup=1) > 0


def test_fp8_without_gpu_is_a_typed_error():
    from puzzle.errors import UnknownTargetError

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(UnknownTargetError, match="fp8"):
        measure_block_ms(TINY, KINDS[0], DECODE, dtype="fp8")


def test_calibrate_target_measures_fits_saves_and_reuses(fake_cpu, tmp_path):
    from puzzle.profiler.calibrate import calibrate_target, sub_blocks

    target = parse_target("cpu")
    candidates = [KINDS, KINDS[:2]]
    assert [b.label for b in sub_blocks(candidates)] == ["gqa:2|no_op", "gqa:1|no_op", "linear|no_op",
                                                          "no_op|swiglu:96", "no_op|linear", "no_op|swiglu:32"]
    path = tmp_path / "cal.json"
    fitted = calibrate_target(target, TINY, candidates, [DECODE], measure=True, calibration=path,
                              repeats=1, warmup=0, stream_bytes=0, progress=False)
    assert path.is_file() and fitted.accelerator.efficiency != target.accelerator.efficiency
    reused = calibrate_target(target, TINY, candidates, [DECODE], measure=False, calibration=path)
    assert reused.accelerator.efficiency == fitted.accelerator.efficiency
