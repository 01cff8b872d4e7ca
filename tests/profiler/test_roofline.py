"""Roofline times: op = max(compute, memory) + kernel overhead, ring all-reduces, tensor parallelism,
and the acceptance check: the analytic H100 profile is within 15% of every measured H100 point.

Run ``python -m pytest tests/profiler/test_roofline.py -s`` to see the predicted-vs-measured table.
"""

from __future__ import annotations

import csv
import re
from importlib import resources
from pathlib import Path

import pytest

from puzzle.errors import UnknownTargetError
from puzzle.profiler import counts, roofline
from puzzle.profiler.counts import ModelShape, Op
from puzzle.profiler.hardware import ACCELERATORS, Target, parse_target
from puzzle.profiler.scenario import Scenario
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_CSV = REPO_ROOT.parent / "shared" / "calibration" / "h100_measured.csv"
TOLERANCE = 0.15

LLAMA8B = ModelShape(hidden_size=4096, num_attention_heads=32, head_dim=128, vocab_size=128256,
                     tie_word_embeddings=False)
LLAMA8B_BLOCK = BlockConfig(attention=AttentionConfig.gqa(8), ffn=FFNConfig.swiglu(14336))
NO_OP_BLOCK = BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.no_op())


def peaks(target: Target, dtype: str) -> tuple[float, float, float]:
    """(achieved FLOP/s at dtype, achieved bytes/s, kernel overhead s) from the target's raw fields."""
    acc = target.accelerator
    eff = acc.efficiency
    return (acc.tflops[dtype] * 1e12 * eff.compute[dtype], acc.bandwidth_tbs * 1e12 * eff.memory,
            eff.kernel_overhead_us * 1e-6)


def ring_seconds(target: Target, payload: float) -> float:
    n, acc = target.tp, target.accelerator
    ring = 2 * (n - 1) / n * payload / (acc.link_gbs * 1e9 * acc.efficiency.link)
    return ring + acc.efficiency.allreduce_latency_us * 1e-6


# ------------------------------------------------------------------------------------ single ops


def test_compute_bound_op():
    h100 = parse_target("1xH100")
    op = Op("big", flops=1e15, bytes=1e6, kernels=2)
    # 1e15 FLOP at 0.796 x 989.4 TFLOP/s = 1.27 s; 1 MB at 0.89 x 3.35 TB/s = 0.3 us.
    assert roofline.op_seconds(op, h100) == pytest.approx(1e15 / (989.4e12 * 0.796) + 2 * 0.25e-6, rel=1e-9)
    flops_rate, _, overhead = peaks(h100, "bf16")
    assert roofline.op_seconds(op, h100) == pytest.approx(1e15 / flops_rate + 2 * overhead, rel=1e-12)


def test_memory_bound_op():
    h100 = parse_target("1xH100")
    op = Op("stream", flops=1e6, bytes=1e10, kernels=3)
    assert roofline.op_seconds(op, h100) == pytest.approx(1e10 / (3.35e12 * 0.89) + 3 * 0.25e-6, rel=1e-9)


def test_balanced_op_is_the_max_not_the_sum():
    h100 = parse_target("1xH100")
    flops_rate, bytes_rate, overhead = peaks(h100, "bf16")
    op = Op("ridge", flops=flops_rate * 1e-3, bytes=bytes_rate * 1e-3 * 0.5, kernels=1)
    assert roofline.op_seconds(op, h100) == pytest.approx(1e-3 + overhead, rel=1e-9)


def test_fp8_uses_the_fp8_peak_and_efficiency():
    fp8 = parse_target("1xH100", dtype="fp8")
    op = Op("gemm", flops=1e15, bytes=1.0, kernels=1, dtype="fp8")
    assert roofline.op_seconds(op, fp8) == pytest.approx(1e15 / (1978.9e12 * 0.718) + 0.25e-6, rel=1e-9)
    # Attention and elementwise ops keep computing in bf16 on an fp8 target.
    op16 = Op("sdpa", flops=1e15, bytes=1.0, kernels=1, dtype="bf16")
    assert roofline.op_seconds(op16, fp8) == pytest.approx(1e15 / (989.4e12 * 0.796) + 0.25e-6, rel=1e-9)
    # An fp8 GEMM on fp8 is faster than the same GEMM in bf16 by 2 x 0.718 / 0.796.
    bf16_gemm = counts.gemm("g", 8192, 8192, 8192, "bf16")
    fp8_gemm = counts.gemm("g", 8192, 8192, 8192, "fp8")
    speedup = roofline.op_seconds(bf16_gemm, parse_target("1xH100")) / roofline.op_seconds(fp8_gemm, fp8)
    assert speedup == pytest.approx(2 * 0.718 / 0.796, rel=1e-3)


def test_a100_fp8_is_refused():
    with pytest.raises(UnknownTargetError, match=r"A100-80GB does not support fp8; it supports \['bf16'\]"):
        parse_target("A100", dtype="fp8")
    with pytest.raises(UnknownTargetError, match="it supports"):
        ACCELERATORS["A100-80GB"].peak_flops("fp8")


def test_other_gpus_use_their_own_peaks():
    datasheets = [("1xB200", 2250e12, 8.0e12), ("A100", 312e12, 2.039e12), ("1xL40S", 362.05e12, 0.864e12),
                  ("1xH200", 989.4e12, 4.8e12)]
    for text, peak, bandwidth in datasheets:
        target = parse_target(text)
        eff = target.accelerator.efficiency
        compute = Op("c", flops=1e14, kernels=0)
        memory = Op("m", bytes=1e10, kernels=0)
        assert roofline.op_seconds(compute, target) == pytest.approx(1e14 / (peak * eff.compute["bf16"]), rel=1e-9)
        assert roofline.op_seconds(memory, target) == pytest.approx(1e10 / (bandwidth * eff.memory), rel=1e-9)


def test_decode_gemm_costs_its_weight_bytes_whatever_the_batch():
    # Below M ~ 128 a decode matmul streams its weights: 8192 x 28672 x 2 bytes / (0.89 x 3.35 TB/s) ~ 158 us.
    h100 = parse_target("1xH100")
    weights = 8192 * 28672 * 2
    for m in (1, 8, 32):
        t = roofline.op_seconds(counts.gemm("g", m, 8192, 28672, "bf16"), h100)
        assert t == pytest.approx(weights / (3.35e12 * 0.89) + 1e-6, rel=0.01)


# --------------------------------------------------------------------------------- all-reduces


@pytest.mark.parametrize("text", ["2xH100", "4xH100", "8xH100", "8xB200", "2xL40S", "4xA100"])
def test_allreduce_follows_the_ring_formula(text):
    target = parse_target(text)
    n, payload = target.tp, 8 * 1024 * 4096 * 2  # a (8, 1024, 4096) bf16 partial sum
    link, eff = target.accelerator.link_gbs * 1e9, target.accelerator.efficiency
    expected = 2 * (n - 1) / n * payload / (link * eff.link) + eff.allreduce_latency_us * 1e-6
    got = roofline.op_seconds(Op("ar", kernels=0, allreduce_bytes=payload), target)
    assert got == pytest.approx(expected, rel=1e-12)


def test_allreduce_on_8xh100_by_hand():
    # 64 MiB over 8 ranks: 2 * 7/8 * 64 MiB / (450 GB/s * 0.8) + 8 us.
    payload = 64 * 2**20
    t = roofline.op_seconds(Op("ar", kernels=0, allreduce_bytes=payload), parse_target("8xH100"))
    assert t == pytest.approx(1.75 * payload / 360e9 + 8e-6, rel=1e-9)


def test_allreduce_is_free_on_one_device():
    assert roofline.op_seconds(Op("ar", kernels=0, allreduce_bytes=1e9), parse_target("1xH100")) == 0.0


def test_lm_head_gather_is_an_all_gather_of_the_full_logits():
    # Ring all-gather of X bytes: (n - 1) / n * X / link.
    target, B, a = parse_target("8xH100"), 64, 2
    ops = {op.name: op for op in counts.fixed_ops(LLAMA8B, Scenario(name="d", phase="decode", batch=B, length=10),
                                                  dtype="bf16", tp=8)}
    logits = B * 8 * 16032 * a  # 128256 / 8 = 16032 columns per rank
    acc = target.accelerator
    expected = 7 / 8 * logits / (acc.link_gbs * 1e9 * acc.efficiency.link) + acc.efficiency.allreduce_latency_us * 1e-6
    assert roofline.op_seconds(ops["lm_head.gather"], target) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------- blocks and models


SCENARIOS = [Scenario(name="p", phase="prefill", batch=1, length=1024),
             Scenario(name="p", phase="prefill", batch=8, length=4096),
             Scenario(name="d", phase="decode", batch=1, length=1024),
             Scenario(name="d", phase="decode", batch=256, length=32768)]


TARGETS = [(text, "bf16") for text in ("1xH100", "8xH100", "1xH200", "4xB200", "2xL40S", "A100", "8xA100", "2xB100")]
TARGETS += [(text, "fp8") for text in ("1xH100", "8xH100", "8xH200", "2xL40S")]  # A100 has no fp8


@pytest.mark.parametrize(("text", "dtype"), TARGETS)
def test_no_op_block_costs_nothing(text, dtype):
    target = parse_target(text, dtype=dtype)
    for sc in SCENARIOS:
        assert roofline.block_ms(LLAMA8B, NO_OP_BLOCK, sc, target) == 0.0


def test_tensor_parallel_prefill_is_faster():
    sc = Scenario(name="p", phase="prefill", batch=1, length=1024)
    one = roofline.block_ms(LLAMA8B, LLAMA8B_BLOCK, sc, parse_target("1xH100"))
    eight = roofline.block_ms(LLAMA8B, LLAMA8B_BLOCK, sc, parse_target("8xH100"))
    # The GEMMs alone: 2 * 1024 * 218M FLOP / 787 TFLOP/s ~ 0.57 ms on one GPU; norms, RoPE, SiLU and
    # residuals stream (1024, 4096..14336) activations on top (~0.13 ms).
    gemm_ms = 2 * 1024 * 218_112_000 / (989.4e12 * 0.796) * 1e3
    assert gemm_ms < one < 1.3 * gemm_ms
    # The two all-reduces keep 8 GPUs above 1/8 of it.
    assert one / 8 < eight < one / 2


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_decode_is_weight_bound_and_scales_as_one_over_tp(tp):
    # Batch-1 decode of a Llama-8B block: time = weight bytes per rank / bandwidth + kernel launches + 2 all-reduces.
    sc = Scenario(name="d", phase="decode", batch=1, length=1024)
    target = parse_target(f"{tp}xH100")
    H, hd, m = 4096, 128, 14336
    nh_r, k_r, m_r = 32 // tp, max(1, 8 // tp), m // tp
    weights_r = 2 * (H * nh_r * hd + 2 * H * k_r * hd + nh_r * hd * H + 3 * H * m_r)
    _, bytes_rate, overhead = peaks(target, "bf16")
    kernels = sum(op.kernels for op in counts.block_ops(LLAMA8B, LLAMA8B_BLOCK, sc, dtype="bf16", tp=tp))
    allreduce = 0.0 if tp == 1 else 2 * ring_seconds(target, H * 2)
    weight_time = weights_r / bytes_rate
    got = roofline.block_ms(LLAMA8B, LLAMA8B_BLOCK, sc, target) * 1e-3
    # Activations and the 1024-token KV cache add ~1% on top of the weights.
    assert got - kernels * overhead - allreduce == pytest.approx(weight_time, rel=0.03)
    tp1_weight_time = 2 * 218_112_000 / bytes_rate  # the whole block's parameters (norms are negligible)
    assert weight_time == pytest.approx(tp1_weight_time / tp, rel=0.01)


def test_model_ms_sums_blocks_and_fixed_ops_and_applies_the_host_floor():
    sc = Scenario(name="d", phase="decode", batch=8, length=1024)
    target = parse_target("1xH100")
    blocks = [LLAMA8B_BLOCK, NO_OP_BLOCK, BlockConfig(attention=AttentionConfig.gqa(2), ffn=FFNConfig.linear())]
    lean = roofline.model_ms(LLAMA8B, blocks, sc, target)
    assert lean == pytest.approx(roofline.fixed_ms(LLAMA8B, sc, target)
                                 + sum(roofline.block_ms(LLAMA8B, b, sc, target) for b in blocks))
    hf = roofline.model_ms(LLAMA8B, blocks, sc, target, runtime="hf-eager")
    assert hf == max(lean, roofline.HF_EAGER.step_ms(sc, 3)) and hf > lean
    # A step heavy enough to be device-bound is not raised by the host floor.
    big = Scenario(name="d", phase="decode", batch=256, length=32768)
    heavy = [LLAMA8B_BLOCK] * 32
    device_bound = roofline.model_ms(LLAMA8B, heavy, big, target)
    assert roofline.model_ms(LLAMA8B, heavy, big, target, runtime="hf-eager") == device_bound
    with pytest.raises(ValueError, match="unknown runtime 'vllm'"):
        roofline.model_ms(LLAMA8B, blocks, sc, target, runtime="vllm")


# --------------------------------------------------------------------------- H100 calibration


SHAPES = {  # name: (shape, layers, KV heads, FFN width)
    "smollm2-135m": (ModelShape(hidden_size=576, num_attention_heads=9, head_dim=64, vocab_size=49152,
                                tie_word_embeddings=True), 30, 3, 1536),
    "llama-3.2-1b": (ModelShape(hidden_size=2048, num_attention_heads=32, head_dim=64, vocab_size=128256,
                                tie_word_embeddings=True), 16, 8, 8192),
    "llama-3.1-8b": (LLAMA8B, 32, 8, 14336),
}


def calibration_csv() -> Path:
    """The shared measurements when this checkout sits beside them, else the packaged copy."""
    if SHARED_CSV.is_file():
        return SHARED_CSV
    return Path(str(resources.files("puzzle.profiler") / "data" / "h100_measured.csv"))


def read_rows(path: Path) -> list[dict[str, str]]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return list(csv.DictReader(lines))


def model_of(name: str) -> tuple[ModelShape, list[BlockConfig]]:
    shape, layers, kv, ffn = SHAPES[name]
    return shape, [BlockConfig(attention=AttentionConfig.gqa(kv), ffn=FFNConfig.swiglu(ffn))] * layers


def predict(row: dict[str, str]) -> float:
    """The analytic H100 figure for one measured row, in the row's unit."""
    kind, dtype, text, metric, unit = row["kind"], row["dtype"], row["shape"], row["metric"], row["unit"]
    if kind == "gemm":
        M, K, N = (int(x) for x in text.split()[0].split("x"))
        d = "fp8" if dtype.startswith("fp8") else "bf16"
        op = counts.gemm("gemm", M, K, N, d, out_bytes=2 if d == "fp8" else None)  # _scaled_mm writes bf16
        seconds = roofline.op_seconds(op, parse_target("1xH100", dtype=d))
        if metric == "throughput":
            assert unit == "TFLOP/s"
            return 2 * M * K * N / seconds / 1e12
        assert (metric, unit) == ("latency", "us")
        return seconds * 1e6
    if kind == "copy":
        assert text.startswith("1 GiB") and unit == "TB/s"
        traffic = 2 * 2**30  # read 1 GiB and write 1 GiB
        return traffic / roofline.op_seconds(Op("copy", bytes=traffic), parse_target("1xH100")) / 1e12
    assert kind in ("hf_decode_step", "hf_prefill") and unit == "ms", row
    shape, blocks = model_of(text.split()[0])
    if kind == "hf_decode_step":
        batch = int(re.search(r"\bb(\d+)\b", text).group(1))
        context = int(re.search(r"\bctx(\d+)\b", text).group(1))
        sc = Scenario(name="decode", phase="decode", batch=batch, length=context)
    else:
        batch, prompt = (int(x) for x in re.search(r"\b(\d+)x(\d+)\b", text).groups())
        sc = Scenario(name="prefill", phase="prefill", batch=batch, length=prompt)
    return roofline.model_ms(shape, blocks, sc, parse_target("1xH100"), runtime="hf-eager")


def test_h100_profile_is_within_15_percent_of_every_measured_point():
    path = calibration_csv()
    rows = read_rows(path)
    assert len(rows) == 16, f"{path}: expected the 16 measured H100 points"
    lines, misses = [], []
    for row in rows:
        measured, predicted = float(row["value"]), predict(row)
        error = predicted / measured - 1
        label = f"{row['kind']} {row['dtype'].split()[0]} {row['shape'][:32]}"
        lines.append(f"{label:<60} {measured:>9.4g} {predicted:>9.4g} {row['unit']:<8} {error:+7.1%}")
        if abs(error) > TOLERANCE:
            misses.append(lines[-1])
    print(f"\nH100 analytic profile vs {path}")
    print(f"{'point':<60} {'measured':>9} {'predicted':>9} {'unit':<8} {'error':>7}")
    print("\n".join(lines))
    assert not misses, "off by more than 15%:\n" + "\n".join(misses)


def test_packaged_calibration_matches_the_shared_copy():
    if not SHARED_CSV.is_file():
        pytest.skip(f"{SHARED_CSV} is not present beside this checkout")
    packaged = Path(str(resources.files("puzzle.profiler") / "data" / "h100_measured.csv"))
    assert read_rows(packaged) == read_rows(SHARED_CSV)


def test_lean_runtime_is_far_below_hf_eager_on_smollm2_decode():
    # HF eager decode is host-bound (~100 ms whatever the model); a lean runtime sees the GPU's ~1 ms.
    shape, blocks = model_of("smollm2-135m")
    sc, h100 = Scenario(name="d", phase="decode", batch=1, length=1024), parse_target("1xH100")
    lean = roofline.model_ms(shape, blocks, sc, h100, runtime="lean")
    hf = roofline.model_ms(shape, blocks, sc, h100, runtime="hf-eager")
    assert hf == pytest.approx(106.8, rel=TOLERANCE)
    assert lean < hf / 20


def test_hf_eager_hides_a_cheaper_architecture():
    # Why the lean runtime matters: an architecture with ~half the weights measures as no faster under
    # hf-eager (host-bound), while the lean runtime sees its weight-streaming time drop.
    shape, blocks = model_of("llama-3.1-8b")
    sc, h100 = Scenario(name="d", phase="decode", batch=1, length=1024), parse_target("1xH100")
    cheap = [BlockConfig(attention=AttentionConfig.gqa(2), ffn=FFNConfig.swiglu(7168))] * len(blocks)
    hf, hf_cheap = (roofline.model_ms(shape, b, sc, h100, runtime="hf-eager") for b in (blocks, cheap))
    lean, lean_cheap = (roofline.model_ms(shape, b, sc, h100, runtime="lean") for b in (blocks, cheap))
    assert hf_cheap == hf
    assert lean_cheap < 0.7 * lean
