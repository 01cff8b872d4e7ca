"""The tables of benchmarks/README.md (and of README.md and docs/presets.md), generated from benchmarks/results/*.csv.

    python benchmarks/tables.py           # rewrite every generated block of those pages
    python benchmarks/tables.py --check   # exit 1 when a block is out of date with its CSV

A block sits between ``<!-- table: CSV [key=value ...] -->`` and ``<!-- end table -->``. Each CSV has one
function in ``TABLES`` that turns it into the table a reader needs (a summary where the CSV is large, never a
dump), with the block's options as keywords. The prose around the blocks is written by hand. Needs pandas only.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's root: benchmarks.plan_tables

from benchmarks.plan_tables import markdown as plan_markdown  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
README = RESULTS.parent / "README.md"
PAGES = (README, RESULTS.parents[1] / "README.md", RESULTS.parents[1] / "docs" / "presets.md")
"""Every markdown file with generated tables: benchmarks/README.md, the README and docs/presets.md."""
BLOCK = re.compile(r"(<!-- table: (?P<csv>\S+)(?P<opts>(?: \S+=\S+)*) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table; every cell already formatted."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:+.0f}%"


def spearman(a: pd.Series, b: pd.Series) -> float:
    return float(a.rank().corr(b.rank()))


def parent_load(df: pd.DataFrame) -> str:
    v = dict(zip(df.metric, df.value))
    rows = [["first load (GGUF -> safetensors cache)", f"{v['first_load_with_conversion']:.1f} s"],
            ["cached load (to the first logits)",
             f"{v['cached_load']:.3f} s ({v['cached_load_to_first_logits']:.3f} s)"],
            ["max \\|logit diff\\| vs transformers reading the GGUF (fp32)",
             "0.0: bit-identical" if v["max_abs_logit_diff_vs_transformers"] == 0
             else f"{v['max_abs_logit_diff_vs_transformers']:.1e}"],
            ["prefill, 1 x 512 tokens: puzzle / transformers",
             f"{v['prefill_tokens_per_s[puzzle]']:.0f} / {v['prefill_tokens_per_s[transformers]']:.0f} tokens/s"],
            ["greedy decode (HF `generate`): puzzle / transformers",
             f"{v['decode_tokens_per_s[puzzle]']:.1f} / {v['decode_tokens_per_s[transformers]']:.1f} tokens/s"]]
    return table(["metric", f"{df.model.iloc[0]}, {df.device.iloc[0]}"], rows)


def mip_scale(df: pd.DataFrame) -> str:
    backends = ["ortools-mip", "pulp", "cpsat"]
    rows = []
    for (family, cands), d in df.groupby(["family", "candidates_per_layer"], sort=False):
        name = f"Ultra {d.layers.iloc[0]} x {cands}" if family == "ultra" else f"SmolLM2-shaped {family.split('-')[1]}"
        cells = []
        for presolve in (True, False):
            for b in backends:
                s = d[(d.backend == b) & (d.presolve == presolve)].seconds
                more = f" (max {s.max():.2f})" if len(s) > 1 and presolve else ""
                cells.append(f"{s.median():.2f} s{more}")
        agree = d.groupby("seed").objective.nunique().eq(1).all() and d.verified.all()
        rows.append([name, d.seed.nunique(), *cells, f"{', '.join(sorted(set(d.status)))}; {'yes' if agree else '**no**'}"])
    return table(["problem", "problems", *backends, *[f"{b}, no presolve" for b in backends],
                  "status; all verified at one objective"], rows)


def bld(df: pd.DataFrame) -> str:
    r = df.iloc[0]
    rows = [["variants trained (layers)", f"{r.variants_trained} ({r.layers_with_variants})"],
            ["tokens (steps)", f"{r.tokens:,} ({r.steps})"],
            ["build: calibration, initialization, validation", f"{r.build_s:.0f} s"],
            ["BLD throughput", f"{r.tokens_per_s:.1f} tokens/s ({r.variant_tokens_per_s / 1000:.1f} K variant-tokens/s)"],
            ["BLD wall time", f"{r.train_s:.0f} s"],
            ["peak memory (process RSS)", f"{r.peak_mem_gib:.2f} GiB"],
            ["variants whose validation NMSE dropped", r.improved],
            ["median final / initial validation NMSE",
             f"gqa {r.nmse_ratio_gqa:.3f}, swiglu {r.nmse_ratio_swiglu:.3f}, linear {r.nmse_ratio_linear:.4f}"]]
    return table(["metric", f"{r.model}, {r.device}"], rows)


def profiler_fidelity(df: pd.DataFrame) -> str:
    cpu = df[df.target.str.startswith("cpu")]
    rows = []
    for scenario, d in cpu.groupby("scenario", sort=False):
        fitted = d[~d.variant.str.startswith("fixed")]
        fixed = d[d.variant.str.startswith("fixed")].rel_err
        rows.append([f"this CPU, {scenario}", len(fitted), f"{fitted.rel_err.abs().median():.1%}",
                     f"{fitted.rel_err.abs().max():.1%}", f"{fitted.uncal_rel_err.abs().median():.0%}",
                     f"{fitted.a_vs_b.abs().median():.1%}", pct(fixed.iloc[0]) if len(fixed) else "-"])
    rows.append(["this CPU, all rows (fixed included)", len(cpu), f"{cpu.rel_err.abs().median():.1%}",
                 f"{cpu.rel_err.abs().max():.1%}", f"{cpu.uncal_rel_err.abs().median():.0%}",
                 f"{cpu.a_vs_b.abs().median():.1%}", ""])
    h100 = df[~df.target.str.startswith("cpu")]
    if len(h100):
        rows.append([f"H100 model vs the shipped measurements", len(h100), f"{h100.rel_err.abs().median():.1%}",
                     f"{h100.rel_err.abs().max():.1%}", "-", "-", "-"])
    return table(["set", "rows", "median \\|error\\|", "max \\|error\\|", "uncalibrated median",
                  "set A vs set B (repeat noise)", "embedding + LM head (never fitted)"], rows)


def fusion(df: pd.DataFrame) -> str:
    rows = []
    for r in df.itertuples():
        setting = f"{r.score} <= {r.threshold:g}" + (f", + {r.distill_steps} distillation steps" if r.distill_steps else "")
        rows.append([setting, r.segments, f"{r.layers_before} -> {r.layers_after}", f"{r.kl_fused_to_unfused:.3f}",
                     f"{r.kl_fused_to_parent:.3f}",
                     f"{r.pred_8xH100_bf16_decode_speedup:.3f}x / {r.pred_8xH100_bf16_prefill_speedup:.3f}x",
                     f"{r.meas_cpu_decode_speedup:.2f}x / {r.meas_cpu_prefill_speedup:.2f}x"])
    before = df.kl_unfused_to_parent.iloc[0]
    return table(["segment score", "fused", "layers", "KL fused vs unfused", f"KL to parent (before {before:.3f})",
                  "8xH100 bf16 decode / prefill (predicted)", "this CPU decode / prefill (measured)"], rows)


def fusion_segments(df: pd.DataFrame) -> str:
    rows = [[name, f"{spearman(df[col], df.kl):.2f}"] for name, col in
            (("max pairwise dependency (default)", "max_dependency"), ("mean pairwise dependency (the paper's)",
             "mean_dependency"), ("parallel error", "parallel_error"))]
    return table([f"segment score ({len(df)} segments of {df.layers.min()}-{df.layers.max()} layers)",
                  "Spearman with the KL of fusing it alone"], rows)


def realized_speedup(df: pd.DataFrame) -> str:
    rows = []
    for solution, d in df.groupby("solution", sort=False):
        cells = []
        for scenario in ("decode", "prefill"):
            r = d[d.scenario == scenario].iloc[0]
            cells += [f"{r.predicted_speedup:.3f}x", f"{r.measured_speedup:.3f}x", f"{r.ratio:.0%}"]
        r = d.iloc[0]
        rows.append([solution, r.child_layers_attention, f"{r.child_params_m:.1f} M", *cells])
    return table(["child", "layers with attention", "params", "decode predicted", "decode measured",
                  "measured / predicted", "prefill predicted", "prefill measured", "measured / predicted"], rows)


def engine_speed(df: pd.DataFrame) -> str:
    rows = [[f"{r.solution} ({r.no_op_attention} of {r.layers})", f"{r.predicted_speedup:.3f}x",
             f"**{r.engine_speedup:.3f}x** ({r.engine_parent_ms:.1f} -> {r.engine_child_ms:.1f} ms)",
             f"**{r.ratio:.0%}**", f"{r.runtime_speedup:.3f}x ({r.runtime_parent_ms:.0f} -> {r.runtime_child_ms:.0f} ms)",
             f"{r.kl:.3f}"] for r in df.itertuples()]
    r = df.iloc[0]
    return table(["child (no-op attentions of layers)", "predicted (calibrated CPU roofline)",
                  f"inside vLLM, {r.scenario} batch {r.batch} x {r.length}", "vLLM / predicted",
                  "this project's runtime", "KL (no GKD)"], rows)


def end_to_end(df: pd.DataFrame) -> str:
    rows = []
    for r in df.itertuples():
        rows.append([("**total**" if r.stage == "total" else r.stage) + (" (skipped)" if r.skipped else ""),
                     f"{r.seconds:.1f}" if r.seconds < 10 else f"{r.seconds:.0f}", f"{r.peak_rss_gib:.1f}"])
    r = df.iloc[0]
    total = df[df.stage == "total"].seconds.iloc[0]
    rows[-1][1] = f"**{total:.0f} ({int(total // 60)} min {int(total % 60)} s)**"
    return table(["stage", "seconds", "peak RSS (GiB)"], rows) + (
        f"\n\n{r.model}, `--budget {r.budget}`, preset {r.preset}, {r.threads} threads.")


def frontier(df: pd.DataFrame) -> str:
    seeds = sorted(df.seed.dropna().astype(int).unique())
    names = {"puzzle": "**puzzle**", "uniform_ffn": "uniform FFN", "shortgpt": "ShortGPT",
             "attention_removal": "attention removal"}
    rows = []
    for target, t in df.groupby("target_speedup"):
        for i, (model, name) in enumerate(names.items()):
            d = t[t.model == model].set_index("seed").reindex([float(s) for s in seeds])
            ok = d.feasible.astype(bool)
            lead = f"{target:g}x" if i == 0 else ""
            if not ok.any():
                rows.append([lead, name, f"infeasible: at most {d.pred_decode_speedup.min():.2f}"
                             f"-{d.pred_decode_speedup.max():.2f}x", "", "", "", ""])
                continue
            kls = " / ".join(f"{r.kl_to_parent:.3f}" if r.feasible else f"infeasible (at most {r.pred_decode_speedup:.3f}x)"
                             for r in d.itertuples())
            mean = f"{d.kl_to_parent.mean():.3f}" if ok.all() else ""
            if model == "puzzle":
                kls, mean = f"**{kls}**", f"**{mean}**"
            rows.append([lead, name, f"{d[ok].pred_decode_speedup.mean():.3f}x", kls, mean,
                         f"{d[ok].top1_agreement.mean():.3f}", f"{d[ok].ppl.mean():,.0f}" if d[ok].ppl.mean() >= 1000
                         else f"{d[ok].ppl.mean():.1f}"])
    seeds_text = " / ".join(map(str, seeds))
    return table(["target", "model", "predicted decode (mean)", f"KL to parent, seed {seeds_text}", "mean KL",
                  "top-1 agreement", "perplexity"], rows)


def gkd_cache(df: pd.DataFrame) -> str:
    live, cached = df[df["mode"] == "live"].iloc[0], df[df["mode"] == "cached"].iloc[0]
    rows = [["parent targets, computed once", "-", f"{cached.cache_s:.0f} s, {cached.cache_mb:.0f} MB"],
            [f"GKD training ({live.steps} steps, {live.train_tokens:,} tokens)", f"{live.train_tokens_per_s:.0f} tokens/s",
             f"**{cached.train_tokens_per_s:.0f} tokens/s ({cached.train_tokens_per_s / live.train_tokens_per_s:.2f}x)**"],
            ["share of the exact KL the loss sees before training", f"{live.kl_captured:.0%}", f"{cached.kl_captured:.0%}"],
            ["held-out KL before -> after (exact, live parent)", f"{live.val_kl_before:.3f} -> **{live.val_kl_after:.3f}**",
             f"{cached.val_kl_before:.3f} -> **{cached.val_kl_after:.3f}**"],
            [f"GKD of the child and {int(cached.children) - 1} baselines (projected)", f"{live.children_s:.0f} s",
             f"**{cached.children_s:.0f} s**"]]
    return table(["", "live parent", f"cached top-{cached.top_k} targets"], rows)


def ffn_refit(df: pd.DataFrame) -> str:
    inits = list(dict.fromkeys(df.init))
    tokens = sorted(df.bld_tokens.unique())
    name = {i: i.replace("refit:", "refit, ridge ") for i in inits}
    header = ["FFN width"] + [name[i] + (f" + BLD ({t:,} tokens)" if t else "") for t in tokens for i in inits]
    rows = []
    for (frac, width), d in df.groupby(["fraction", "width"], sort=False):
        cells = []
        for t in tokens:
            copy = d[(d.init == "copy") & (d.bld_tokens == t)].kl.iloc[0]
            for i in inits:
                kl = d[(d.init == i) & (d.bld_tokens == t)].kl.iloc[0]
                cells.append(f"{kl:.3f}" if i == "copy" else f"{kl:.3f} ({pct(kl / copy - 1)})")
        rows.append([f"{width} ({frac:g})", *cells])
    return table(header, rows)


QUALITY_ROWS = {
    "uniform_ffn": "uniform FFN pruning (untrained)", "uniform_ffn_refit": "uniform FFN pruning, least-squares refit",
    "uniform_ffn_child_refit": "control: uniform pruning + child-stream refit",
    "uniform_ffn_child_bld": "control: uniform pruning + child-aware BLD", "puzzle": "MIP optimum",
    "puzzle_child_bld": "MIP optimum + child-aware BLD", "puzzle_search": "best of the search's {n} finalists",
    "puzzle_search_child_refit": "+ child-stream refit",
    "puzzle_search_child_bld": "**`puzzle search`'s child** (+ child-aware BLD)",
    "puzzle_finalists_child_bld": "best of {n} finalists + child-aware BLD",
    "shortgpt": "ShortGPT", "attention_removal": "attention removal",
}
"""quality.csv's methods, in the order of the pipeline, with their row labels."""


def quality(df: pd.DataFrame, preset: str) -> str:
    """One row per method, one column per decoder-FLOPs budget: KL to the parent (mean over seeds, with the
    range when there are several) and its change against uniform pruning."""
    df = df.assign(ranks=df["ranks"].fillna(1) if "ranks" in df else 1)
    ranks = df["ranks"]
    d, sharded = df[(df.preset == preset) & (ranks == 1)], df[(df.preset == preset) & (ranks > 1)]
    budgets = sorted(d.flops_pct.unique(), reverse=True)
    seeds = d.seed.nunique()
    rows = []
    for method, label in QUALITY_ROWS.items():
        m = d[d.method == method]
        if m.empty:
            continue
        if "{n}" in label:
            n = d[d.method == method.removesuffix("_child_bld")].finalists.dropna()
            if method == "puzzle_finalists_child_bld" and n.max() <= d[d.method == "puzzle_search"].finalists.max():
                continue  # the search measured them all: the same child as the search's
            label = label.format(n=int(n.iloc[0]) if len(n) else "?")
        cells = []
        for b in budgets:
            kl = m[m.flops_pct == b].kl.dropna()
            if kl.empty:
                cells.append("infeasible")
                continue
            uniform = d[(d.method == "uniform_ffn") & (d.flops_pct == b)].kl.mean()
            spread = f"{kl.min():.3f}-{kl.max():.3f}"
            text = f"{kl.mean():.3f}" + (f" ({spread})" if kl.min().round(3) != kl.max().round(3) else "")
            if method != "uniform_ffn":
                text += f", {pct(kl.mean() / uniform - 1)}"
            if method in ("uniform_ffn", "puzzle_search_child_bld"):
                text += f", ppl {m[m.flops_pct == b].ppl.mean():.1f}"
            control = d[(d.method == "uniform_ffn_child_bld") & (d.flops_pct == b)].kl.mean()
            if method == "puzzle_search_child_bld" and control == control:  # the control trained as the child was
                text += f", {pct(kl.mean() / control - 1)} vs the control"
            cells.append(f"**{text}**" if method == "puzzle_search_child_bld" else text)
        rows.append([label, *cells])
        for n, g in sharded[sharded.method == method].groupby("ranks") if method == "puzzle_search_child_bld" else ():
            cells = []  # the same search under torchrun: its child against the one-process child
            for b in budgets:
                kl, one = g[g.flops_pct == b].kl.dropna(), m[m.flops_pct == b].kl.mean()
                cells.append(f"{kl.mean():.3f}, {100 * (kl.mean() / one - 1):+.1f}% vs one process" if len(kl) else "")
            rows.append([f"the same search on {int(n)} ranks (torchrun)", *cells])
        if method == "puzzle_search_child_bld" and seeds > 1:  # the search's child on each seed
            for seed, s in m.groupby("seed"):
                rows.append([f"the search's child, seed {seed}",
                             *[f"{s[s.flops_pct == b].kl.mean():.3f}" for b in budgets]])
    head = "KL to the parent" + (f" (mean of {seeds} seeds, range)" if seeds > 1 else f" (seed {d.seed.iloc[0]})")
    return table([head, *[f"{b:g}% of the decoder FLOPs" for b in budgets]], rows)


def quality_fidelity(df: pd.DataFrame) -> str:
    """Per preset and budget: how well the MIP's predicted KL ranks its finalists (measured on finalist tokens)."""
    rows = []
    for (preset, budget), d in df.groupby(["preset", "budget"], sort=False):
        per_seed = [g for _, g in d.groupby("seed")]
        rho = " / ".join(f"{spearman(g.predicted_kl, g.kl):.2f}" for g in per_seed)
        pred = max(g.predicted_kl.max() / g.predicted_kl.min() - 1 for g in per_seed)
        meas = max(g.kl.max() / g.kl.min() - 1 for g in per_seed)
        above = d.kl / d.predicted_kl - 1
        rows.append([preset, f"{100 * float(budget.split('=')[1]):.1f}%", f"{len(per_seed)} x {len(per_seed[0])}", rho,
                     f"{pred:.2%}", f"{meas:.0%}", f"{above.min():.0%} to {above.max():.0%}"])
    return table(["preset", "decoder FLOPs", "seeds x finalists", "Spearman (predicted, measured), per seed",
                  "spread of the predicted KL", "spread of the measured KL", "measured above predicted"], rows)


def score_fidelity(df: pd.DataFrame) -> str:
    half = len(df) // 2
    d = df.sort_values("flops_pct")
    rows = []
    for name, part in (("all budgets", d), ("upper half", d.iloc[half:]), ("lower half", d.iloc[:half])):
        under = part.kl / part.predicted - 1
        rows.append([name, f"{part.flops_pct.min():.0f}-{part.flops_pct.max():.0f}%", len(part),
                     f"{spearman(part.predicted, part.kl):.2f}", f"{part.predicted.corr(part.kl):.3f}",
                     f"{under.min():.0%} to {under.max():.0%}"])
    return table(["MIP optima", "decoder FLOPs", "children", "Spearman", "Pearson",
                  "measured KL above the predicted loss"], rows)


def refine(df: pd.DataFrame) -> str:
    def step(start: float, end: float, bold: str = "") -> str:
        return f"{start:.3f} -> {bold}{end:.3f}{bold} ({pct(end / start - 1)})"

    rows = [[f"{r.flops_pct:g}%", f"{r.spearman_before:.2f}", f"**{r.spearman_after:.2f}**", f"{r.spearman_ceiling:.2f}",
             f"{r.context_swaps} ({r.context_s:.0f} s)", step(r.first4_start_eval_kl, r.first4_refined_eval_kl),
             step(r.all_start_eval_kl, r.all_refined_eval_kl, "**")] for r in df.itertuples()]
    return table(["decoder FLOPs", "before: summed replace-1 scores", "after: context-aware scores",
                  "ceiling: the finalists' own KL", "swaps measured (time)", "refinement from 4 finalists",
                  f"refinement from all {df.finalists.iloc[0]}"], rows)


def refine_children(df: pd.DataFrame) -> str:
    rows = []
    for flops, d in df.groupby("flops_pct", sort=False):
        fin = d[d.source == "finalist"]
        picked = fin.loc[fin.finalist_kl.idxmin()]
        cells = [f"{fin[fin.mip_rank == 0].eval_kl.iloc[0]:.3f}", f"{picked.eval_kl:.3f} (rank {picked.mip_rank})",
                 f"{fin.eval_kl.min():.3f}"]
        for source in ("refined_first4", "refined_all"):
            kls = d[d.source == source].sort_values("round").eval_kl
            cells.append(" -> ".join(f"{k:.3f}" for k in kls) or "-")
        rows.append([f"{flops:g}%", len(fin), *cells])
    return table(["decoder FLOPs", "finalists", "MIP optimum", "lowest on the finalist tokens",
                  "lowest of all (hindsight)", "refined from 4, by round", "refined from all, by round"], rows)


def scale(df: pd.DataFrame) -> str:
    rows = []
    for stage, d in df.groupby("stage", sort=False):
        cells = [f"{r.predicted_peak_gib:.2f} / {r.measured_peak_gib:.2f} GiB ({r.ratio:.2f})" + (" waits" if r.idle else "")
                 for r in d.sort_values("rank").itertuples()]
        r = d.iloc[0]
        rounds = " / ".join(str(x) for x in d.sort_values("rank").rounds)
        ok = "yes" if d.within_plan.all() and d.within_limit.all() else "**no**"
        rows.append([stage, *cells, rounds, f"{d.predicted_s.max():.0f} / {r.measured_s:.0f} s", ok])
    ranks = sorted(df["rank"].unique())
    return table(["stage", *[f"rank {k}: plan / measured (ratio)" for k in ranks], "rounds per rank",
                  "time: plan / measured", "within plan and limit"], rows)


def stage_times(df: pd.DataFrame) -> str:
    """One row per stage, one column per run: the plan's seconds against the measured ones (ratio); stages under a
    minute in plain figures, a stage outside 0.67-1.5 in bold, one measured beside other work marked (load)."""
    runs = list(dict.fromkeys(df.run))
    rows = []
    for stage in dict.fromkeys(df.stage):
        cells = []
        for run in runs:
            d = df[(df.run == run) & (df.stage == stage)]
            if not len(d):
                cells.append("-")
                continue
            r = d.loc[d.predicted_s.idxmax()]
            cell = f"{r.predicted_s:.0f} / {r.measured_s:.0f} s ({r.ratio:.2f})"
            cell = f"**{cell}**" if r.checked and not r.within else cell
            cells.append(cell + ("" if r.quiet else f", load {r.load:.1f}"))
        rows.append([stage, *cells])
    return table(["stage", *[f"{run}: plan / measured (ratio)" for run in runs]], rows)


def reliability(df: pd.DataFrame) -> str:
    """One row per case of benchmarks/reliability.py: its verdict, and what it said (the first line of stderr,
    which is what is judged; where it crashed or ran on, the last line, which says why)."""
    def said(r) -> str:
        text = str(r.message if r.verdict in ("ok", "wrong-message", "wrong-exit") else r.last_line)
        return (text if len(text) <= 110 else text[:107] + "...").replace("|", "\\|")

    rows = [[f"`{r.case}`", r.why, "ok" if r.verdict == "ok" else f"**{r.verdict}**",
             r.exit if isinstance(r.exit, str) else f"{r.exit:.0f}", r.wrote_files, said(r)]
            for r in df.fillna({"message": "", "last_line": "", "exit": "-"}).itertuples()]
    return table(["case", "issue 31 point", "verdict", "exit", "files written", "stderr"], rows)


def context(df: pd.DataFrame) -> str:
    """One row per quality context of benchmarks/context.py: the child it chose and its KL by judged context."""
    rows = [[f"{r.context} tokens", r.attention_kept, f"{r.ffn_kept:.3f}", f"{r.speedup:.3f}x", f"{r.kl_256:.3f}",
             f"{r.kl_1024:.3f}", f"{r.kl_ratio:.2f}", f"{r.top1_1024:.3f}", f"{r.ppl_1024:.1f}",
             f"{r.search_s / 60:.1f} min",
             " / ".join(f"{getattr(r, f'{s}_peak_ratio', float('nan')):.2f}" for s in ("score", "child_bld", "gkd"))]
            for r in df.itertuples()]
    return table(["searched at", "attention kept", "FFN width kept", "predicted speedup", "KL at 256",
                  "KL at 1024", "KL 1024 / 256", "top-1 at 1024", "perplexity at 1024", "search",
                  "peak measured / plan: score, child_bld, gkd"], rows)


def allocations(df: pd.DataFrame) -> str:
    """One row per allocation of benchmarks/allocations.py: its widths in brief, its KL after the refit and how far
    below uniform pruning's."""
    rows = []
    for r in df.itertuples():
        ws = [int(w) for w in str(r.widths).split()]
        brief = f"{ws[0]}, {ws[1]}, ... {ws[-2]}, {ws[-1]} ({min(ws)}-{max(ws)})"
        vs = "-" if r.allocation == "uniform" else f"{100 * r.vs_uniform:+.0f}%"
        rows.append([r.allocation.replace("_", " "), brief, f"{r.kl:.3f}", vs, f"{r.top1:.3f}", f"{r.refit_s:.0f} s"])
    return table(["allocation", "FFN widths: first, second ... last (range)", "KL after the refit", "vs uniform",
                  "top-1", "refit"], rows)


TABLES: dict[str, Callable[..., str]] = {
    "parent_load.csv": parent_load, "mip_scale.csv": mip_scale, "bld.csv": bld,
    "profiler_fidelity.csv": profiler_fidelity, "fusion.csv": fusion, "fusion_segments.csv": fusion_segments,
    "realized_speedup.csv": realized_speedup, "engine_speed.csv": engine_speed, "end_to_end.csv": end_to_end,
    "frontier.csv": frontier, "gkd_cache.csv": gkd_cache, "ffn_refit.csv": ffn_refit, "quality.csv": quality,
    "quality_fidelity.csv": quality_fidelity, "score_fidelity.csv": score_fidelity, "refine.csv": refine,
    "refine_children.csv": refine_children, "scale.csv": scale, "scale_context.csv": scale, "plan_tables.csv": plan_markdown,
    "reliability.csv": reliability, "stage_times.csv": stage_times, "context.csv": context,
    "allocations.csv": allocations,
}
"""CSV name -> the function that turns it into a markdown table (its options are keyword arguments)."""


def render(csv: str, opts: str, results: Path = RESULTS) -> str:
    """The generated body of one block: the table of ``results/csv`` with ``opts`` (`` key=value ...``)."""
    if csv not in TABLES:
        raise KeyError(f"no table function for {csv!r}: add one to TABLES in benchmarks/tables.py")
    kwargs = dict(opt.split("=", 1) for opt in opts.split())
    return "\n" + TABLES[csv](pd.read_csv(results / csv), **kwargs) + "\n\n"


def regenerate(text: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """``text`` with every generated block rewritten, and the markers of the blocks that changed."""
    stale: list[str] = []

    def sub(m: re.Match) -> str:
        body = render(m["csv"], m["opts"], results)
        if body != m["body"]:
            stale.append(m[1].strip())
        return m[1] + body + m[5]

    return BLOCK.sub(sub, text), stale


def blocks(text: str) -> list[tuple[str, str]]:
    """(csv, options) of every generated block in ``text``."""
    return [(m["csv"], m["opts"].strip()) for m in BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block is out of date")
    ap.add_argument("--readme", type=Path, action="append",
                    help="a markdown file (repeatable; default: benchmarks/README.md, README.md, docs/presets.md)")
    args = ap.parse_args(argv)
    bad = 0
    for page in args.readme or PAGES:
        text = page.read_text()
        new, stale = regenerate(text)
        if args.check:
            sys.stdout.write("".join(f"{page}: out of date: {m} (run python benchmarks/tables.py)\n" for m in stale))
            bad += len(stale)
            continue
        if new != text:
            page.write_text(new)
        print(f"{page}: {len(blocks(text))} tables, {len(stale)} rewritten")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
