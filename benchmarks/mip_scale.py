"""MIP solve time at Llama-3.1-Nemotron-Ultra scale: 162 layers, up to 100 candidates per layer.

    python benchmarks/mip_scale.py [--quick]

Each problem is random but shaped like the real one (hidden 16384, 128 query heads of 128,
parent GQA with 8 KV heads and SwiGLU 53248, bf16 weights). Candidates are attention variants
(gqa:8 parent, gqa:4, gqa:1, linear, no_op) x FFN variants (SwiGLU at 18 widths from 100% to 5%
of the parent's, linear, no_op): 5 x 20 = 100 per layer, or an evenly spaced subset. Costs
follow parameter counts: bytes exactly, decode latency for batch 64 x context 4096 on a
26.8 TB/s (8 x H100) memory-bound model plus launch overhead, with 5% log-normal noise. Scores
(KL-like) are positive, grow as a block shrinks, and vary by layer importance (log-normal); the
parent's own block scores 0. Budget: memory <= 45% of the parent's and speedup >= 2.2 (both bind at the optimum).

For every backend, with and without the dominance presolve, and every random problem
(``--seeds``) it reports the wall time of ``solve`` (compile, presolve, solve, verify), whether the solution was
verified, the optimality gap from the solver's bound (0: proven optimal; CBC via PuLP exposes no
bound, so 0 there means CBC proved optimality with relative gap 0), and the objective (all
backends must agree). A second family, ``smollm2-xS``, is SmolLM2-135M-shaped (30 identical layers
x 20 variants, speedup >= S, proxy scores with many near-ties): small, but the hard case for
CBC's branch and bound; it runs under a time limit (60 s, 10 s with --quick) and a backend that
stops there reports status ``feasible`` and its gap (NaN for CBC, which exposes no bound).
Prints a table and writes benchmarks/results/mip_scale.csv.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import random
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from solvers.backends import BACKENDS, solve  # noqa: E402
from solvers import Candidate, Problem, Scenario  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "mip_scale.csv"
HIDDEN, HEAD_DIM, VOCAB, PARENT_FFN = 16384, 128, 128256, 53248
BANDWIDTH = 8 * 3.35e12  # bytes/s
BATCH, CONTEXT = 64, 4096
ATTENTION = {"gqa:8": 0.0, "gqa:4": 0.05, "gqa:1": 0.3, "linear": 0.6, "no_op": 1.0}  # relative damage
FFN_FRACTIONS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.175, 0.15, 0.125, 0.1, 0.075, 0.05]


def _attention(label: str) -> tuple[int, int]:
    """(params, kv bytes per token) of an attention variant."""
    if label.startswith("gqa:"):
        k = int(label[4:])
        return 2 * HIDDEN * HIDDEN + 2 * HIDDEN * k * HEAD_DIM + HIDDEN, 2 * k * HEAD_DIM * 2
    return (HIDDEN * HIDDEN + HIDDEN, 0) if label == "linear" else (0, 0)


def _ffn(label: str) -> tuple[int, float]:
    """(params, relative damage) of an FFN variant."""
    if label.startswith("swiglu:"):
        m = int(label[7:])
        return 3 * HIDDEN * m + HIDDEN, (1 - m / PARENT_FFN) ** 1.5
    return (HIDDEN * HIDDEN + HIDDEN, 0.9) if label == "linear" else (0, 1.0)


def variants(per_layer: int) -> list[str]:
    ffn = [f"swiglu:{round(PARENT_FFN * f / 256) * 256}" for f in FFN_FRACTIONS] + ["linear", "no_op"]
    labels = [f"{a}|{f}" for a in ATTENTION for f in ffn]
    step = len(labels) / per_layer  # an evenly spaced subset that keeps the parent (index 0)
    return [labels[int(i * step)] for i in range(per_layer)]


def ultra_problem(layers: int, per_layer: int, seed: int) -> Problem:
    rng = random.Random(seed)
    parent = f"gqa:8|swiglu:{PARENT_FFN}"
    labels = variants(per_layer)
    cands = []
    for layer in range(layers):
        imp_attn, imp_ffn = rng.lognormvariate(-5, 1), rng.lognormvariate(-4.5, 1)
        for label in labels:
            a, f = label.split("|")
            (pa, kv), (pf, dmg_f) = _attention(a), _ffn(f)
            params = pa + pf
            wbytes = 2 * params
            overhead = 0.004 * ((a != "no_op") + (f != "no_op"))
            ms = (wbytes + kv * BATCH * CONTEXT) / BANDWIDTH * 1e3 * rng.lognormvariate(0, 0.05) + overhead
            damage = (imp_attn * ATTENTION[a] + imp_ffn * dmg_f) * rng.lognormvariate(0, 0.2)
            kl = 0.0 if label == parent else damage + 1e-6
            cands.append(Candidate(id=f"{layer}:{label}", layers=(layer,), members=(label,),
                                   costs={"params": params, "weight_bytes": wbytes, "kv_bytes_per_token": kv,
                                          "decode_ms": ms},
                                   scores={"kl": kl}, attrs={"is_parent": label == parent}))
    embed = 2 * VOCAB * HIDDEN
    fixed = {"params": embed, "weight_bytes": 2 * embed, "decode_ms": 2 * embed / BANDWIDTH * 1e3 + 1.0}
    problem = Problem(candidates=tuple(cands), score_column="kl", fixed=fixed,
                      scenario=Scenario(name="decode", phase="decode", batch=BATCH, length=CONTEXT))
    parent_memory = problem.totals(problem.parent).memory_bytes
    return problem.with_budget(memory_bytes=0.45 * parent_memory, speedup=2.2)


# SmolLM2-135M shapes: 30 identical layers (a homogeneous parent: every layer's variant costs the
# same), hidden 576, 9 heads of 64, parent GQA 3 KV heads and SwiGLU 1536. Costs are exact sizes
# with a memory-bound latency proxy; scores are a smooth per-layer PROXY (convex in the fraction of
# parameters removed, edges more sensitive), i.e. many near-ties, the hard case for branch and bound.
SMOL_H, SMOL_HEADS, SMOL_HD = 576, 9, 64
SMOL_ATTENTION = ["gqa:3", "gqa:1", "linear", "no_op"]
SMOL_FFN = ["swiglu:1536", "swiglu:1024", "swiglu:512", "linear", "no_op"]


def _smol_params(label: str) -> tuple[int, int]:
    a, f = label.split("|")
    h, q = SMOL_H, SMOL_HEADS * SMOL_HD
    fixed = {"linear": h * h + h, "no_op": 0}
    pa = fixed[a] if a in fixed else 2 * h * q + 2 * h * int(a[4:]) * SMOL_HD + h
    pf = fixed[f] if f in fixed else 3 * h * int(f[7:]) + h
    return pa + pf, (2 * int(a[4:]) * SMOL_HD * 2 if a.startswith("gqa") else 0)


def smollm2_problem(speedup: float) -> Problem:
    parent = "gqa:3|swiglu:1536"
    full, _ = _smol_params(parent)
    cands = []
    for layer in range(30):
        depth = 1.0 + 0.5 * math.cos(math.pi * layer / 29) ** 2 + 0.1 * (layer % 7) / 7
        for label in (f"{a}|{f}" for a in SMOL_ATTENTION for f in SMOL_FFN):
            params, kv = _smol_params(label)
            a = label.split("|")[0]
            attention = {"gqa:3": 0.0, "gqa:1": 0.0, "linear": 0.6, "no_op": 1.0}[a] * (0.5 + layer / 29) * 0.2
            cands.append(Candidate(id=f"{layer}:{label}", layers=(layer,), members=(label,),
                                   costs={"params": params, "weight_bytes": 2 * params, "kv_bytes_per_token": kv,
                                          "decode_ms": 2 * params / 3e9 * 1e3},
                                   scores={"kl": depth * (1 - params / full) ** 2 + attention},
                                   attrs={"is_parent": label == parent}))
    embed = 49152 * SMOL_H
    problem = Problem(candidates=tuple(cands), score_column="kl",
                      scenario=Scenario(name="decode", phase="decode", batch=1, length=4096),
                      fixed={"params": embed, "weight_bytes": 2 * embed, "decode_ms": 2 * embed / 3e9 * 1e3})
    return problem.with_budget(speedup=speedup)


def _run(rows: list, problem: Problem, *, family: str, layers: int, per_layer: int, seed: int,
         time_limit: float) -> None:
    for backend, presolve in itertools.product(BACKENDS, (True, False)):
        t0 = time.perf_counter()
        sol = solve(problem, backend, time_limit=time_limit, presolve=presolve)  # verified inside
        seconds = time.perf_counter() - t0
        t = sol.totals
        rows.append({"family": family, "backend": backend, "presolve": presolve, "layers": layers,
                     "candidates_per_layer": per_layer, "seed": seed, "variables": len(problem.candidates),
                     "seconds": round(seconds, 3), "solver_seconds": round(sol.seconds, 3), "gap": sol.gap,
                     "status": sol.status, "verified": True, "objective": round(sol.objective, 9),
                     "speedup": round(t.speedup, 4), "memory_gib": round(t.memory_bytes / 2**30, 2),
                     "machine": f"{platform.machine()} ({_cores()} cores)"})
        print(f"{family:14s} {backend:12s} presolve={presolve!s:5s} {layers} x {per_layer} seed {seed}: "
              f"{seconds:.3f} s, {sol.status}, gap {sol.gap:.2g}, objective {sol.objective:.9g}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="162 layers x 25 and x 100 candidates, one seed (under a minute)")
    ap.add_argument("--seeds", type=int, default=None, help="random problems per size (default 3; 1 with --quick)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per solve before giving up (default 120)")
    args = ap.parse_args(argv)
    sizes = [(162, 25), (162, 100)] if args.quick else [(162, 25), (162, 50), (162, 100)]
    seeds = range(args.seeds or (1 if args.quick else 3))
    rows: list = []
    for (layers, per_layer), seed in itertools.product(sizes, seeds):
        _run(rows, ultra_problem(layers, per_layer, seed=seed), family="ultra", layers=layers,
             per_layer=per_layer, seed=seed, time_limit=args.time_limit)
    smol_limit = min(args.time_limit, 10.0 if args.quick else 60.0)
    for speedup in ((1.5,) if args.quick else (1.2, 1.5, 2.0)):
        _run(rows, smollm2_problem(speedup), family=f"smollm2-x{speedup}", layers=30, per_layer=20, seed=0,
             time_limit=smol_limit)
    table = pd.DataFrame(rows)
    summary = table.groupby(["family", "backend", "presolve", "layers", "candidates_per_layer"], sort=False).agg(
        seeds=("seed", "count"), median_s=("seconds", "median"), max_s=("seconds", "max"), max_gap=("gap", "max"))
    print(summary.reset_index().to_string(index=False))
    for key, group in table[table["status"] == "optimal"].groupby(["family", "layers", "candidates_per_layer", "seed"]):
        spread = group["objective"].max() - group["objective"].min()
        if spread > 1e-6 * max(1.0, abs(group["objective"].max())):
            print(f"warning: backends disagree at {key} by {spread:.3g}", file=sys.stderr)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS, index=False)
    print(f"wrote {RESULTS}")
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
