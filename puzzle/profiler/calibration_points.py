"""The analytic H100 model next to the H100 measurements this project ships (``data/h100_measured.csv``).

Each CSV row becomes one point ``(name, predicted, measured)`` in the row's own unit:

* ``gemm ... MxKxN throughput`` (TFLOP/s) and ``latency`` (us): one :func:`~puzzle.profiler.counts.gemm` op;
* ``copy ... 1 GiB device-to-device`` (TB/s, read + write): one op moving 2 GiB;
* ``hf_decode_step`` / ``hf_prefill`` (ms): :func:`~puzzle.profiler.roofline.model_ms` of the named
  model's shape with ``runtime="hf-eager"``.

No torch needed: this is what the H100 calibration test and ``benchmarks/profiler_fidelity.py`` read.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import NamedTuple

from puzzle.profiler.counts import ModelShape, Op, gemm
from puzzle.profiler.hardware import Target, parse_target
from puzzle.profiler.roofline import model_ms, op_seconds
from puzzle.profiler.scenario import Scenario
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

H100_CSV = Path(__file__).resolve().parent / "data" / "h100_measured.csv"


class ModelSpec(NamedTuple):
    shape: ModelShape
    layers: int
    kv_heads: int
    ffn: int

    @property
    def blocks(self) -> list[BlockConfig]:
        block = BlockConfig(attention=AttentionConfig.gqa(self.kv_heads), ffn=FFNConfig.swiglu(self.ffn))
        return [block] * self.layers


MODELS = {
    "smollm2-135m": ModelSpec(ModelShape(576, 9, 64, 49152, tie_word_embeddings=True), 30, 3, 1536),
    "llama-3.2-1b": ModelSpec(ModelShape(2048, 32, 64, 128256, tie_word_embeddings=True), 16, 8, 8192),
    "llama-3.1-8b": ModelSpec(ModelShape(4096, 32, 128, 128256, tie_word_embeddings=False), 32, 8, 14336),
}
"""The model shapes the ``hf_*`` rows were measured with."""


class Point(NamedTuple):
    name: str
    """``kind dtype shape metric [unit]``."""
    predicted: float
    measured: float


def _dtype(text: str) -> str:
    return "fp8" if text.startswith("fp8") else text.split()[0]


def _predict(kind: str, dtype: str, shape: str, metric: str, target: Target) -> float:
    if kind == "gemm":
        m, k, n = (int(v) for v in re.match(r"(\d+)x(\d+)x(\d+)", shape).groups())
        op = gemm("gemm", m, k, n, dtype)
        seconds = op_seconds(op, target)
        return op.flops / seconds / 1e12 if metric == "throughput" else seconds * 1e6  # TFLOP/s or us
    if kind == "copy":
        size = 2**30 * float(re.match(r"([\d.]+)\s*GiB", shape).group(1))
        op = Op("copy", bytes=2.0 * size, dtype="bf16")  # read + write
        return op.bytes / op_seconds(op, target) / 1e12  # TB/s
    if kind in ("hf_decode_step", "hf_prefill"):
        spec = MODELS[shape.split()[0]]
        if kind == "hf_decode_step":
            batch, ctx = (int(v) for v in re.search(r"b(\d+) ctx(\d+)", shape).groups())
            sc = Scenario(name="decode", phase="decode", batch=batch, length=ctx)
        else:
            batch, prompt = (int(v) for v in re.search(r"(\d+)x(\d+)", shape).groups())
            sc = Scenario(name="prefill", phase="prefill", batch=batch, length=prompt)
        return model_ms(spec.shape, spec.blocks, sc, target, runtime="hf-eager")
    raise ValueError(f"unknown calibration row kind {kind!r}")


def h100_rows(path: str | Path = H100_CSV, *, target: Target | None = None) -> list[dict[str, object]]:
    """Every row of the H100 CSV with the analytic prediction: kind, dtype, shape, metric, unit, predicted, measured."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    rows = []
    for r in csv.DictReader(lines):
        dtype = _dtype(r["dtype"])
        # One H100, not the default target: the CSV was measured on a single GPU.
        tgt = target or parse_target("1xH100", dtype=dtype if dtype in ("bf16", "fp8") else "bf16")
        if target is not None and dtype != tgt.dtype and dtype in tgt.accelerator.tflops:
            tgt = Target(accelerator=tgt.accelerator, count=tgt.count, tensor_parallel=tgt.tp, dtype=dtype)
        rows.append({"kind": r["kind"], "dtype": dtype, "shape": r["shape"], "metric": r["metric"], "unit": r["unit"],
                     "predicted": _predict(r["kind"], dtype, r["shape"], r["metric"], tgt),
                     "measured": float(r["value"])})
    return rows


def h100_points(path: str | Path = H100_CSV) -> list[Point]:
    """``(name, predicted, measured)`` for every row of the H100 calibration CSV (units per row)."""
    return [Point(f"{r['kind']} {r['dtype']} {r['shape']} {r['metric']} [{r['unit']}]",
                  float(r["predicted"]), float(r["measured"])) for r in h100_rows(path)]
