"""benchmarks/gpu_smoke.py: without CUDA every check is a clean skip; its CPU-side pieces are right.

The checks themselves need a GPU (the ``gpu`` test at the end runs ``--quick`` for real); here the
script's bookkeeping, its shapes and config, and the static-cache greedy decode are tested on the CPU.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_smoke
from benchmarks.gpu_smoke import CHECKS, SHAPES, Context, Row, Skipped

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.py"


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_without_cuda_every_check_is_a_skip_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "smoke.csv"
    assert gpu_smoke.main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _read(out)
    assert [r["check"] for r in rows] == list(CHECKS)
    assert {r["status"] for r in rows} == {"skip"} and all("no CUDA" in r["detail"] for r in rows)
    assert all(f"{name:<20} skip" in printed for name in CHECKS)


def test_without_cuda_and_out_nothing_is_written(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = gpu_smoke.RESULTS
    before = results.stat().st_mtime_ns if results.exists() else None
    assert gpu_smoke.main(["--only", "fp8_scaled_mm"]) == 0
    assert "nothing written" in capsys.readouterr().out
    assert (results.stat().st_mtime_ns if results.exists() else None) == before


@pytest.mark.slow  # a fresh interpreter importing torch: several seconds on a loaded machine
def test_the_script_without_cuda_exits_0_with_skips(tmp_path):
    out = tmp_path / "smoke.csv"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(f"{name:<20} skip" in r.stdout for name in CHECKS)
    assert {row["status"] for row in _read(out)} == {"skip"} and len(_read(out)) == len(CHECKS)


def test_unknown_check_is_refused():
    with pytest.raises(SystemExit, match="unknown check"):
        gpu_smoke.parse_checks("bld_bf16,nope")
    assert gpu_smoke.parse_checks(" fp8_scaled_mm , bld_bf16") == ["fp8_scaled_mm", "bld_bf16"]


def test_full_shape_is_llama_3_1_8b_cut_to_4_layers():
    s = SHAPES["full"]
    assert (s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.ffn, s.vocab) == (4, 4096, 32, 8, 128, 14336, 128256)
    from benchmarks.random_parent import parameter_count

    assert parameter_count(s.parent_shape()) == 4 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) \
        + 2 * 128256 * 4096 + 4096
    quick = SHAPES["quick"]
    assert quick.vocab >= 49152  # SmolLM2's token ids, the BLD data's
    assert quick.heads // quick.kv_heads == s.heads // s.kv_heads


@pytest.mark.parametrize("which", ["full", "quick"])
def test_library_config_offers_one_of_each_variant_and_bf16_autocast(which):
    s = SHAPES[which]
    cfg = gpu_smoke.library_config(s, steps=3)
    assert cfg.bld.dtype == "auto" and cfg.bld.device == "cuda" and cfg.bld.tokens == 3 * cfg.bld.batch_size * 256
    (lv,) = cfg.space.layer_variants([s.parent_block()], num_attention_heads=s.heads)
    assert [a.label for a in lv.attention] == [f"gqa:{s.kv_heads}", f"gqa:{s.kv_heads // 2}", "linear"]
    assert [f.label for f in lv.ffn] == [f"swiglu:{s.ffn}", f"swiglu:{s.ffn // 2}", "linear"]


def test_accelerator_for_reads_the_cuda_device_name():
    assert gpu_smoke.accelerator_for("NVIDIA H100 80GB HBM3") == "H100-SXM"
    assert gpu_smoke.accelerator_for("NVIDIA H200") == "H200"
    assert gpu_smoke.accelerator_for("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert gpu_smoke.accelerator_for("NVIDIA L40S") == "L40S"
    assert gpu_smoke.accelerator_for("Tesla T4") == "H100-SXM"  # unknown: the default datasheet


def test_a_failing_check_does_not_hide_the_others(tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("kernel\nexploded")

    def absent(ctx):
        raise Skipped("needs 2 GPUs, found 1")

    monkeypatch.setitem(CHECKS, "bld_bf16", boom)
    monkeypatch.setitem(CHECKS, "nccl_2gpu", absent)
    monkeypatch.setitem(CHECKS, "fp8_scaled_mm", lambda ctx: "fine")
    ctx = Context(shape=SHAPES["quick"], work=tmp_path)
    rows = [gpu_smoke.run_check(n, ctx) for n in ("bld_bf16", "nccl_2gpu", "fp8_scaled_mm", "static_cache_decode")]
    assert [(r.status, r.detail) for r in rows] == [
        ("fail", "RuntimeError: kernel exploded"), ("skip", "needs 2 GPUs, found 1"), ("ok", "fine"),
        ("skip", "no parent (random_parent did not run or failed)")]
    late = Context(shape=SHAPES["quick"], work=tmp_path, deadline=0.0)
    assert gpu_smoke.run_check("fp8_scaled_mm", late) == Row("fp8_scaled_mm", "skip", 0.0,
                                                              "time limit reached before it started")


def test_static_cache_greedy_decode_equals_no_cache(tiny_llama_dir):
    from puzzle.loading import load_model

    model = load_model(tiny_llama_dir)  # fp32, CPU
    prompt = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    cached, ms = gpu_smoke.greedy_static(model, prompt, 12)
    assert cached.shape == (3, 12) and ms > 0
    assert torch.equal(cached, gpu_smoke.greedy_no_cache(model, prompt, 12))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_smoke_passes_on_a_gpu(tmp_path):
    out = tmp_path / "smoke.csv"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    rows = _read(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [row["check"] for row in rows] == list(CHECKS)
    assert all(row["status"] == "ok" for row in rows if row["check"] not in ("nccl_2gpu", "fp8_scaled_mm")), rows
