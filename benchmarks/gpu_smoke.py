"""GPU readiness: every CUDA-only path of puzzle, once, on random weights of real shapes.

    python benchmarks/gpu_smoke.py [--quick] [--out benchmarks/results/gpu_smoke.csv] [--time-limit 540]
                                   [--only bld_bf16,fp8_scaled_mm]

The parent is a random Llama-3.1-8B-shaped model cut to 4 layers (hidden 4096, 32 heads / 8 KV heads,
head_dim 128, FFN 14336, vocab 128256; bf16, SmolLM2's tokenizer for the BLD data); ``--quick`` uses a
2-layer 256-wide one (under a minute). Checks, one row each of the printed table and of the CSV
(check, status ok / fail / skip, seconds, detail):

  random_parent        write the parent (benchmarks/random_parent.py: sharded safetensors, no download)
  bld_bf16             build_library + train_library on CUDA with bld.dtype=auto (bf16 autocast):
                       tokens/s and final / initial validation NMSE
  nccl_2gpu            with 2+ GPUs: a torchrun pair on NCCL (all-reduce, send/recv, bus bandwidth) and
                       `puzzle library build --train` on 2 processes against 1 (same NMSE)
  cuda_event_profile   `puzzle profile --measure`'s path (calibrate_target -> measure_blocks, CUDA
                       events, fit): measured ms against the roofline of the datasheet target
  fp8_scaled_mm        the profiler's FP8Linear (torch._scaled_mm, e4m3, per-tensor scales) on a
                       4096 x 4096 x 14336 GEMM: error against bf16, TFLOP/s against the datasheet
  static_cache_decode  greedy decode through a preallocated KV cache (the profiler's ModelKVCache,
                       advanced per step): ms/token; in fp32 its tokens equal a no-cache decode's

Without CUDA every check is a ``skip`` row, the exit status is 0, and a CSV is written only to an
explicit ``--out`` (the GPU results are never overwritten by a CPU run). Each check runs in its own
try/except; checks starting after ``--time-limit`` seconds are skipped. Exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import csv
import gc
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
RESULTS = ROOT / "benchmarks" / "results" / "gpu_smoke.csv"
COLUMNS = ("check", "status", "seconds", "detail")


@dataclass(frozen=True)
class SmokeShape:
    """The parent's sizes and how hard each check pushes them."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    bld_steps: int
    gemm: tuple[int, int, int]  # (M tokens, K in, N out)
    decode: tuple[int, int, int]  # (batch, prompt, new tokens)
    context: int  # profiler scenarios: prompt / cached tokens

    def parent_shape(self) -> dict[str, Any]:
        """Llama config fields for ``benchmarks.random_parent.write_random_parent`` (overrides of its base)."""
        return {"base": "llama-3.2-1b", "num_hidden_layers": self.layers, "hidden_size": self.hidden,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.ffn, "vocab_size": self.vocab, "tie_word_embeddings": False}

    def parent_block(self) -> Any:
        from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

        return BlockConfig(attention=AttentionConfig.gqa(self.kv_heads), ffn=FFNConfig.swiglu(self.ffn))

    def model_shape(self) -> Any:
        from puzzle.profiler.counts import ModelShape

        return ModelShape(self.hidden, self.heads, self.head_dim, self.vocab, tie_word_embeddings=False)


SHAPES = {
    # Llama-3.1-8B's layer and vocabulary, 4 layers (1.9 B parameters, 3.9 GB in bf16).
    "full": SmokeShape(layers=4, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256,
                       bld_steps=16, gemm=(4096, 4096, 14336), decode=(8, 128, 128), context=1024),
    # Tiny, 4 query heads per KV head as in 8B; the vocabulary is SmolLM2's, whose ids the BLD data holds.
    "quick": SmokeShape(layers=2, hidden=256, heads=8, kv_heads=2, head_dim=32, ffn=1024, vocab=49152,
                        bld_steps=4, gemm=(1024, 1024, 3584), decode=(2, 16, 16), context=128),
}


class Skipped(Exception):
    """A check that cannot run here (its reason goes to the detail column)."""


@dataclass
class Row:
    check: str
    status: str  # ok / fail / skip
    seconds: float
    detail: str


@dataclass
class Context:
    shape: SmokeShape
    work: Path
    deadline: float = math.inf  # time.perf_counter() after which nothing starts
    parent: Path | None = None  # set by the random_parent check

    def need_parent(self) -> Path:
        if self.parent is None:
            raise Skipped("no parent (random_parent did not run or failed)")
        return self.parent

    def seconds_left(self) -> float:
        return self.deadline - time.perf_counter()


# ------------------------------------------------------------------------------------------ the checks


def check_random_parent(ctx: Context) -> str:
    from benchmarks.random_parent import write_random_parent

    ctx.parent = write_random_parent(ctx.shape.parent_shape(), ctx.work / "parent", dtype="bfloat16", seed=0)
    files = list(ctx.parent.glob("*.safetensors"))
    return f"{sum(f.stat().st_size for f in files) / 1e9:.2f} GB of bf16 weights in {len(files)} file(s)"


def library_config(shape: SmokeShape, *, steps: int, device: str = "cuda") -> Any:
    """A small search space (one fewer-KV GQA, one half-width FFN, the two linears) trained ``steps`` steps
    of 8 x 256 tokens with ``dtype: auto`` (bf16 autocast on CUDA)."""
    from block_library import LibraryConfig

    return LibraryConfig.from_dict({
        "space": {"attention": {"kv_heads": [max(1, shape.kv_heads // 2)], "linear": True, "no_op": False},
                  "ffn": {"sizes": [0.5], "linear": True, "no_op": False}},
        "bld": {"tokens": steps * 8 * 256, "batch_size": 8, "dtype": "auto", "device": device,
                "checkpoint_every": 0, "calib_sequences": 8, "val_sequences": 8},
        "data": {"seq_len": 256}})


def check_bld(ctx: Context) -> str:
    from block_library import build_library, open_library, train_library

    cfg = library_config(ctx.shape, steps=ctx.shape.bld_steps)
    lib_dir = build_library(str(ctx.need_parent()), ctx.work / "lib", cfg, progress=False)
    torch.cuda.reset_peak_memory_stats()
    train_library(lib_dir, progress=False)
    lib = open_library(lib_dir)
    device, bld = lib.manifest["build"]["device"], lib.manifest["bld"]
    if not device.startswith("cuda"):
        raise AssertionError(f"the library was built on {device}, not CUDA")
    t = lib.table[lib.table.trained.astype(bool)]
    ratio = t.final_val_nmse / t.init_val_nmse
    if not ratio.map(math.isfinite).all():
        raise AssertionError(f"non-finite NMSE: {t[['variant', 'init_val_nmse', 'final_val_nmse']].to_dict('records')}")
    tok_s = bld["tokens"] / bld["seconds_this_run"]
    return (f"{len(t)} variants x {bld['steps']} steps on {device}: {tok_s:.0f} tok/s, "
            f"final/init NMSE median {ratio.median():.3f} (improved {int((ratio < 1).sum())}/{len(t)}), "
            f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def _torchrun(nproc: int, args: list[str], ctx: Context) -> str:
    """Run ``args`` under ``torchrun --standalone --nproc-per-node nproc``; its stdout, or raise with stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(30.0, ctx.seconds_left()))
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} on {nproc} processes exited {r.returncode}: {r.stderr[-1500:]}")
    return r.stdout


def nccl_worker() -> int:
    """One rank of the NCCL check: all-reduce, send/recv to the next rank, bus bandwidth of a 256 MiB all-reduce."""
    import torch.distributed as dist

    from block_library.distributed import close_shard, init_shard
    from puzzle.profiler.measure import time_ms

    shard = init_shard([1.0] * int(os.environ.get("WORLD_SIZE", "1")), device="cuda")
    x = torch.full((1 << 20,), float(shard.rank + 1), device=shard.device)
    dist.all_reduce(x)
    ok = bool((x == shard.world * (shard.world + 1) / 2).all())
    if not shard.last:  # the hidden-state hand-off of block_library.teacher.run_pass
        shard.send(torch.arange(4096.0, device=shard.device) + shard.rank)
    if not shard.first:
        got = shard.recv((4096,), torch.float32)
        ok &= torch.equal(got, torch.arange(4096.0, device=shard.device) + shard.rank - 1)
    big = torch.ones(64 << 20, device=shard.device)  # 256 MiB of fp32
    ms = time_ms(lambda: dist.all_reduce(big), shard.device, repeats=5, warmup=2)
    busbw = big.numel() * 4 / (ms * 1e-3) * 2 * (shard.world - 1) / shard.world / 1e9
    if shard.first:
        print(f"nccl: world {shard.world}, all-reduce and send/recv {'ok' if ok else 'WRONG'}, "
              f"256 MiB all-reduce {ms:.2f} ms = {busbw:.0f} GB/s bus bandwidth", flush=True)
    close_shard(shard)
    return 0 if ok else 1


def check_nccl(ctx: Context) -> str:
    import yaml

    from block_library import open_library

    if torch.cuda.device_count() < 2:
        raise Skipped(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    parent = ctx.need_parent()
    printed = _torchrun(2, [str(Path(__file__).resolve()), "--nccl-worker"], ctx).splitlines()
    line = next((s for s in printed if s.startswith("nccl:")), "")
    if "WRONG" in line or not line:
        raise AssertionError(line or "the NCCL worker printed nothing")
    cfg = ctx.work / "nccl_library.yaml"
    cfg.write_text(yaml.safe_dump(library_config(ctx.shape, steps=2).to_dict()))
    tables = {}
    for n in (1, 2):
        out = ctx.work / f"lib_{n}proc"
        _torchrun(n, ["-m", "puzzle.cli.main", "library", "build", str(parent), "--out", str(out), "--config", str(cfg),
                      "--train", "--no-progress"], ctx)
        lib = open_library(out)
        if lib.manifest["build"]["world_size"] != n:
            raise AssertionError(f"built on {lib.manifest['build']['world_size']} processes, not {n}")
        tables[n] = lib.table.set_index(["layer", "subblock", "variant"])
    one, two = tables[1].final_val_nmse, tables[2].final_val_nmse
    rel = ((two - one).abs() / one.clip(lower=1e-12)).max()
    if not rel < 1e-2:
        raise AssertionError(f"2-process library differs from 1-process: max relative NMSE difference {rel:.3g}")
    return f"{line.removeprefix('nccl: ')}; 2-process library build+train = 1-process (max rel NMSE diff {rel:.1e})"


def accelerator_for(device_name: str) -> str:
    """The ``ACCELERATORS`` key whose model number the CUDA device name holds (H100-SXM when none does)."""
    from puzzle.profiler.hardware import ACCELERATORS

    upper = device_name.upper()
    return next((key for key in ACCELERATORS if key.split("-")[0] in upper), "H100-SXM")


def check_profile(ctx: Context) -> str:
    from puzzle.profiler.calibrate import calibrate_target
    from puzzle.profiler.fit import load_calibration
    from puzzle.profiler.hardware import parse_target
    from puzzle.profiler.roofline import block_ms
    from puzzle.profiler.scenario import Scenario, parse_scenario
    from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

    s = ctx.shape
    shape, target = s.model_shape(), parse_target(f"1x{accelerator_for(torch.cuda.get_device_name())}", dtype="bf16")
    half = BlockConfig(attention=AttentionConfig.gqa(max(1, s.kv_heads // 2)), ffn=FFNConfig.swiglu(s.ffn // 2))
    scenarios = [parse_scenario(f"prefill:batch=1,prompt={s.context}"),
                 parse_scenario(f"decode:batch=8,context={s.context}")]
    cal = ctx.work / "calibration.json"  # not the user's cache
    fitted = calibrate_target(target, shape, [[s.parent_block(), half]], scenarios, measure=True, calibration=cal,
                              repeats=10, warmup=3, progress=False)
    ratios, fit_err = [], []
    for r in load_calibration(cal).records:
        block, sc = BlockConfig.from_dict(r["block"]), Scenario.from_dict(r["scenario"])
        if not r["measured_ms"] > 0:
            raise AssertionError(f"{block.label} {sc.name}: measured {r['measured_ms']} ms")
        ratios.append(r["measured_ms"] / block_ms(shape, block, sc, target))
        fit_err.append(abs(block_ms(shape, block, sc, fitted) / r["measured_ms"] - 1))
    ratios.sort()
    return (f"{len(ratios)} sub-block timings (CUDA events) / roofline of {target.name}: median "
            f"{ratios[len(ratios) // 2]:.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}; after the fit median |error| "
            f"{sorted(fit_err)[len(fit_err) // 2]:.1%}")


def check_fp8(ctx: Context) -> str:
    from torch import nn

    from puzzle.errors import UnknownTargetError
    from puzzle.profiler import measure
    from puzzle.profiler.hardware import ACCELERATORS

    dev = torch.device("cuda")
    try:
        measure.check_fp8(dev)
    except UnknownTargetError as e:
        raise Skipped(str(e)) from None
    M, K, N = ctx.shape.gemm
    with torch.inference_mode():
        lin = nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)  # (M, K)
        fp8 = measure.FP8Linear(lin)
        ref, out = lin(x).float(), fp8(x).float()  # (M, N)
        rel = float((out - ref).norm() / ref.norm())
        a_scale = (x.abs().amax().float() / measure.FP8_MAX).clamp(min=1e-12)
        xq = (x / a_scale).to(torch.float8_e4m3fn)

        def bare() -> torch.Tensor:  # the GEMM alone, operands already in e4m3
            return torch._scaled_mm(xq, fp8.weight_t, scale_a=a_scale, scale_b=fp8.w_scale, out_dtype=torch.bfloat16)

        ms = {name: measure.time_ms(f, dev, repeats=20, warmup=5)
              for name, f in (("fp8", bare), ("bf16", lambda: lin(x)), ("fp8_linear", lambda: fp8(x)))}
    acc = ACCELERATORS[accelerator_for(torch.cuda.get_device_name())]
    tf = {k: 2 * M * K * N / (ms[k] * 1e-3) / 1e12 for k in ("fp8", "bf16")}
    if not rel < 0.1:
        raise AssertionError(f"FP8 output differs from bf16 by {rel:.3f} (relative Frobenius norm)")
    return (f"{M}x{K}x{N}: rel error vs bf16 {rel:.3f}; _scaled_mm {tf['fp8']:.0f} TFLOP/s "
            f"({tf['fp8'] / acc.tflops['fp8']:.0%} of {acc.name}'s {acc.tflops['fp8']:.0f}), bf16 {tf['bf16']:.0f} "
            f"({tf['bf16'] / acc.tflops['bf16']:.0%}); FP8Linear with activation scaling {ms['fp8_linear']:.3f} ms "
            f"vs bf16 {ms['bf16']:.3f} ms")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def growing_cache(model: Any, *, batch: int, max_tokens: int) -> Any:
    """The profiler's :class:`ModelKVCache` (preallocated, written in place), whose write position
    ``advance(n)`` moves on: the static cache of a real decode rather than of a timing loop."""
    from puzzle.profiler.model_speed import ModelKVCache

    class GrowingCache(ModelKVCache):
        def advance(self, n: int) -> None:
            self.past += n
            for slot in self.slots:
                slot.past += n

    return GrowingCache(model, batch=batch, past=0, new_tokens=max_tokens)


@torch.inference_mode()
def greedy_static(model: Any, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens (B, new_tokens) through a preallocated KV cache, and milliseconds per decode step."""
    B, P = prompt.shape
    cache = growing_cache(model, batch=B, max_tokens=P + new_tokens)

    def step(ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> next token (B, 1)
        logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits  # (B, 1, V)
        cache.advance(ids.shape[1])
        return logits[:, -1].argmax(-1, keepdim=True)

    out = [step(prompt)]
    _sync(prompt.device)
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        out.append(step(out[-1]))
    _sync(prompt.device)
    return torch.cat(out, dim=1), 1e3 * (time.perf_counter() - t0) / max(1, new_tokens - 1)


@torch.inference_mode()
def greedy_no_cache(model: Any, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy tokens (B, new_tokens), recomputing the whole sequence at every step."""
    ids = prompt
    for _ in range(new_tokens):
        nxt = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompt.shape[1]:]


def check_decode(ctx: Context) -> str:
    from puzzle.loading import load_model
    from puzzle.profiler.hardware import parse_target
    from puzzle.profiler.roofline import model_ms
    from puzzle.profiler.scenario import Scenario

    B, P, N = ctx.shape.decode
    model = load_model(ctx.need_parent(), dtype=torch.bfloat16).to("cuda")
    prompt = torch.randint(0, model.config.vocab_size, (B, P), generator=torch.Generator().manual_seed(0)).cuda()
    greedy_static(model, prompt[:, :8], 4)  # warm-up: kernels, allocator
    _, ms = greedy_static(model, prompt, N)
    sc = Scenario(name="decode", phase="decode", batch=B, length=P + N // 2)
    target = parse_target(f"1x{accelerator_for(torch.cuda.get_device_name())}")
    lean = model_ms(ctx.shape.model_shape(), model.config.blocks, sc, target)
    k = min(8, N)
    model.float()  # equality needs fp32: bf16 rounding differs between the two paths and flips near-ties
    cached, _ = greedy_static(model, prompt[:2], k)
    plain = greedy_no_cache(model, prompt[:2], k)
    if not torch.equal(cached, plain):
        raise AssertionError(f"fp32 static-cache tokens {cached.tolist()} != no-cache tokens {plain.tolist()}")
    return (f"batch {B}, prompt {P}, {N} new tokens: {ms:.2f} ms/token eager bf16 ({B * 1e3 / ms:.0f} tok/s; "
            f"lean roofline of {target.name} {lean:.2f} ms); fp32 static cache = no cache for {k} tokens")


CHECKS: dict[str, Callable[[Context], str]] = {
    "random_parent": check_random_parent,
    "bld_bf16": check_bld,
    "nccl_2gpu": check_nccl,
    "cuda_event_profile": check_profile,
    "fp8_scaled_mm": check_fp8,
    "static_cache_decode": check_decode,
}


# ------------------------------------------------------------------------------------------ running


def run_check(name: str, ctx: Context) -> Row:
    """One check in its own try/except: ok with its figures, skip with a reason, or fail with the error."""
    if ctx.seconds_left() <= 0:
        return Row(name, "skip", 0.0, "time limit reached before it started")
    t0 = time.perf_counter()
    try:
        status, detail = "ok", CHECKS[name](ctx)
    except Skipped as e:
        status, detail = "skip", str(e)
    except Exception as e:  # noqa: BLE001 - one failure must not hide the other checks
        traceback.print_exc()
        status, detail = "fail", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row = Row(name, status, round(time.perf_counter() - t0, 1), detail)
    print(format_row(row), flush=True)
    return row


def format_row(row: Row) -> str:
    return f"{row.check:<20} {row.status:<4} {row.seconds:>7.1f}s  {row.detail}"


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(asdict(r) for r in rows)


def parse_checks(text: str | None) -> list[str]:
    names = list(CHECKS) if not text else [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise SystemExit(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (under a minute on a GPU)")
    ap.add_argument("--out", type=Path, help=f"CSV to write (default with CUDA: {RESULTS.relative_to(ROOT)}; "
                    "without CUDA only an explicit --out is written)")
    ap.add_argument("--time-limit", type=float, default=540.0, help="seconds after which no check starts (default 540)")
    ap.add_argument("--only", help=f"comma-separated checks to run (default all: {','.join(CHECKS)}); "
                    "the parent-based ones need random_parent")
    ap.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)  # one torchrun rank of nccl_2gpu
    args = ap.parse_args(argv)
    if args.nccl_worker:
        return nccl_worker()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = parse_checks(args.only)
    start = time.perf_counter()
    if not torch.cuda.is_available():
        rows = [Row(n, "skip", 0.0, "no CUDA device (torch.cuda.is_available() is False)") for n in names]
        for r in rows:
            print(format_row(r))
        out = args.out
    else:
        shape = SHAPES["quick" if args.quick else "full"]
        print(f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}, "
              f"{'quick' if args.quick else 'full'} shape: {shape}", flush=True)
        with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
            ctx = Context(shape=shape, work=Path(tmp), deadline=start + args.time_limit)
            rows = [run_check(n, ctx) for n in names]
        out = args.out or RESULTS
    print(f"total {time.perf_counter() - start:.1f}s")
    if out is not None:
        write_csv(rows, out)
        print(f"wrote {out}")
    else:
        print("no CUDA: nothing written (pass --out to record the skips)")
    return 1 if any(r.status == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
