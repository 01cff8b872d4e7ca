"""Search quality before global distillation: puzzle against simple pruning at equal decoder FLOPs, and how
far the MIP's additive score can be trusted.

    python benchmarks/quality.py [--quick] [--preset quick] [--seed 0] [--fractions 0.75,0.5,0.25]
                                 [--finalists 24] [--child-bld-tokens N] [--ffn-refit] [--child-refit]
                                 [--run runs/quality-quick-s0]
    python benchmarks/quality.py --plot-only

One ``puzzle search --budget cpu`` on SmolLM2-135M gives the BLD-trained library, its replace-1 scores and
its per-variant costs (fusion and GKD off: nothing after the MIP is used). Then, for every FFN keep-ratio
``r`` in ``--fractions``, the budget is the decoder parameters (= decoder FLOPs per token, up to the
attention scores) of the parent with every FFN pruned to ``r`` of its width: 0.75, 0.5 and 0.25 give 81%,
62.5% and 44% of SmolLM2's. At that budget (the MIP's ``max_params``) it compares:

- ``uniform_ffn``: every FFN pruned to ``r`` of its width, untrained: the channels our FFN initializer keeps
  (same calibration tokens, same importance), built in a side library without BLD;
- ``puzzle``: the MIP's optimum over the library (BLD-trained blocks);
- ``puzzle_finalists``: of the MIP's ``--finalists`` best solutions that differ in at least a tenth of
  their layers (:mod:`puzzle.search.finalists`), the one with the lowest KL measured on finalist tokens;
- ``puzzle_search``: the same among the MIP's first ``finalists`` of the preset (quick 4, full 8), as
  ``puzzle search`` chooses; ``puzzle_search_child_bld`` is then the child the search hands to fusion and GKD;
- ``shortgpt`` and ``attention_removal``: the search's baseline rules at the same budget (infeasible where
  removing what they remove cannot reach it);
- ``*_child_bld``: child-aware BLD (:mod:`puzzle.distill.child_bld`, the search's ``child_bld`` stage: the
  replaced sub-blocks retrained on the child's own activations, the preset's tokens; with ``--child-refit``, the
  full preset's default, after the child-stream refit of :mod:`puzzle.distill.child_refit`) applied to the MIP's
  optimum, to the best finalist (what the search hands to GKD) and, as a control, to uniform pruning.

Every child is evaluated on held-out validation text that neither the search (its scoring and evaluation
tokens come first in the split) nor the finalists' choice read. Score fidelity: Spearman's rank correlation
between the predicted KL (summed replace-1 scores) and the KL measured on the finalist tokens, over the
finalists of each budget.

Writes ``benchmarks/results/quality.csv`` (method, preset, seed, budget, flops_pct, gkd, kl, ppl, top1,
predicted_kl, finalists, spearman, detail), ``quality_fidelity.csv`` (every finalist: predicted and
measured KL), keeping the rows of other presets and seeds, ``quality.png`` (one panel per preset: the search's
child, uniform pruning and ShortGPT against decoder FLOPs, the band from the lowest to the highest seed) and
``quality_fidelity.png`` (within each budget, the finalists' measured against predicted KL). ``--plot-only``
redraws both from the committed CSVs without running anything.
``--no-controls`` skips the two control rows' child-aware BLD (uniform pruning, the MIP's optimum). ``--quick``: a random 3-layer parent with tiny sizes (under a minute; its
numbers mean nothing), written to ``results/quality_quick.csv`` and ``quality_fidelity_quick.csv`` (plot: in
the run directory).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's root: benchmarks.tiny_parent

from benchmarks.tiny_parent import write_tiny_parent  # noqa: E402
from puzzle.search import SearchConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["method", "preset", "seed", "ranks", "budget", "flops_pct", "gkd", "kl", "ppl", "top1", "predicted_kl",
           "finalists", "spearman", "detail"]
RESERVED = 16
"""Validation sequences of 256 tokens left to the search (its scoring and evaluation read the split's start)."""


def search_config(quick: bool, preset: str, seed: int, parent: str | None, ffn_refit: bool = False) -> SearchConfig:
    """The search that trains and scores the library; nothing after the MIP is used, so fusion and GKD are off."""
    tail = dict(finalists=1, child_bld_tokens=0, fuse_threshold=0.0, gkd_steps=0, eval_sequences=1, measure_speed=False, seed=seed,
                ffn_refit=ffn_refit)
    if quick:
        return SearchConfig(model=parent, budget="cpu", calibrate=False, batch=2, context=64, bld_tokens=2 * 8 * 256,
                            score_sequences=1, score_seq_len=32, engine="transformers", **tail)
    return SearchConfig(budget="cpu", preset=preset, **tail)


def uniform_library(run: Any, out: Path, fractions: list[float], *, ffn_refit: bool = False) -> Any:
    """A library without BLD whose FFN widths are ``fractions`` of the parent's (attention: the parent's), built
    from the search library's calibration settings: its variants are the untrained uniform prunings (the kept
    channels' down projection copied, or with ``ffn_refit`` refit by least squares)."""
    from block_library import build_library, open_library
    from block_library.space import SearchSpace
    from puzzle.search.stages.library import library_config

    if not (out / "manifest.json").is_file():
        space = SearchSpace.from_dict({"attention": {"kv_heads": [], "linear": False, "no_op": False},
                                       "ffn": {"sizes": fractions, "multiple": 1, "linear": False, "no_op": False}})
        cfg = library_config(run.plan)
        bld = replace(cfg.bld, ffn_refit=ffn_refit)
        build_library(run.plan.model, out, type(cfg)(space=space, data=cfg.data, bld=bld), progress=False)
    return open_library(out)


def held_out(run: Any, tokenizer: Any, finalists: int, evaluation: int) -> tuple[Any, Any]:
    """(finalist ids, evaluation ids): validation sequences of 256 after the :data:`RESERVED` ones, disjoint."""
    from puzzle.search.finalists import finalist_ids

    ids = finalist_ids(run.plan.data, tokenizer, skip=RESERVED, sequences=finalists + evaluation)
    return ids[:finalists], ids[finalists:]


def compare(run_dir: Path, *, quick: bool, preset: str, seed: int, fractions: list[float], k: int,
            finalist_sequences: int, eval_sequences: int, child_bld_tokens: int, controls: bool = True,
            ffn_refit: bool = False, child_refit: bool = False, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The comparison table and the finalists' table, from a finished search in ``run_dir``."""
    import torch

    from block_library import open_library
    from puzzle.data.packing import load_sequences
    from puzzle.distill.child_bld import ChildBLDConfig, train_child_blocks
    from puzzle.distill.child_refit import refit_child_ffns
    from puzzle.loading import load_model, load_tokenizer
    from puzzle.schema import FFNConfig, blocks_from_list
    from puzzle.search import resolve
    from puzzle.search.baselines import block_influence, choose_baseline
    from puzzle.search.config import PRESETS
    from puzzle.search.context import StageContext
    from puzzle.search.stages.child_bld import training_ids as child_bld_ids
    from puzzle.search.finalists import measure, measure_finalists, parent_logprobs, score_fidelity
    from solvers import Budget, solve
    from solvers.diverse import diverse_solutions
    from solvers.io import problem_from_tables
    from solvers.labels import block_dict

    torch.manual_seed(seed)
    plan = resolve(search_config(quick, preset, seed, str(run_dir.parent / "parent") if quick else None, ffn_refit))
    ctx = StageContext(plan, run_dir, False)
    lib = open_library(run_dir / "library" / "lib")
    parent, tok = load_model(plan.model), load_tokenizer(plan.model)
    fin_ids, eval_ids = held_out(ctx, tok, finalist_sequences, eval_sequences)
    eval_ref = parent_logprobs(parent, eval_ids)
    uni = uniform_library(ctx, run_dir / "uniform_library", fractions)
    uni_refit = uniform_library(ctx, run_dir / "uniform_library_refit", fractions, ffn_refit=True) if ffn_refit else None
    scores = pd.read_csv(run_dir / "score" / "scores" / "scores.csv")
    costs = pd.read_csv(run_dir / "profile" / "costs.csv")
    fixed = float(costs[costs.variant == "fixed"].params.sum())
    parent_decoder = float(costs[costs.is_parent.astype(bool)].params.sum())
    influence = block_influence(parent, load_sequences(list(plan.data), tok, seq_len=256, num_sequences=4))
    k_search = PRESETS[preset]["finalists"] if not quick else 2  # what `puzzle search` measures
    cb_cfg = ChildBLDConfig(tokens=child_bld_tokens, seed=seed, refit=child_refit)
    cb_ids = child_bld_ids(plan, tok, cb_cfg)  # as the search's child_bld stage reads them

    def child_bld(method: str, model: Any, budget: dict[str, Any], detail: str) -> dict[str, Any]:
        """Child-aware BLD as the search runs it; with the refit, the child is also measured between the two."""
        refit = {}
        if cb_cfg.refit:  # what train_child_blocks does first, done here to measure the child in between
            n = cb_cfg.steps * cb_cfg.step_batch
            s = refit_child_ffns(model, parent, cb_ids[:n], ridge=cb_cfg.refit_ridge, drift=cb_cfg.refit_drift,
                                 batch=cb_cfg.batch).summary()
            refit = {**_q(measure(model, eval_ids, eval_ref)), "detail": f"{detail}; child-stream refit: "
                     f"{s['refit_layers']} FFNs, {s['refit_tokens']} tokens, {s['refit_seconds']:.0f} s"}
        r = train_child_blocks(model, parent, cb_ids, replace(cb_cfg, refit=False))
        return {**budget, "method": method, **_q(measure(model, eval_ids, eval_ref)), "refit": refit,
                "detail": f"{detail}; child-aware BLD: {len(r.trained)} sub-blocks, {r.tokens} tokens, {r.seconds:.0f} s"
                          + (", after the child-stream refit" if refit else "")}
    rows: list[dict[str, Any]] = []
    fidelity: list[pd.DataFrame] = []
    label = ("quick-test" if quick else preset) + ("+refit" if ffn_refit else "") + ("+child-refit" if child_refit else "")
    base = {"preset": label, "seed": seed, "ranks": 1, "gkd": False}
    parent_blocks = uni.parent_config.blocks
    for r in fractions:
        uniform_blocks = [replace(b, ffn=FFNConfig.swiglu(uniform_width(uni, r))) for b in parent_blocks]
        uniform = uni.assemble(uniform_blocks, initial=True)
        decoder = sum(p.numel() for layer in uniform.model.layers for p in layer.parameters())
        pct = 100.0 * decoder / parent_decoder
        budget = {**base, "budget": f"flops={pct / 100:.3f}", "flops_pct": round(pct, 1)}
        q = measure(uniform, eval_ids, eval_ref)
        rows.append({**budget, "method": "uniform_ffn", **_q(q), "detail": f"every FFN {uniform_blocks[0].ffn.label}, "
                     "untrained (the FFN initializer's channels)"})
        if controls:
            rows += _with_refit(child_bld("uniform_ffn_child_bld", uniform, budget, f"every FFN {uniform_blocks[0].ffn.label}"))
        del uniform
        if uni_refit is not None:  # the same pruning with the least-squares refit of the down projections
            q = measure(uni_refit.assemble(uniform_blocks, initial=True), eval_ids, eval_ref)
            rows.append({**budget, "method": "uniform_ffn_refit", **_q(q),
                         "detail": f"every FFN {uniform_blocks[0].ffn.label}, untrained, least-squares refit"})
        problem = problem_from_tables(scores, costs, score_column="kl", budget=Budget(max_params=fixed + decoder))
        best = solve(problem, backend=plan.value("solver"))
        child = lib.assemble(blocks_from_list(best.block_configs()))
        rows.append({**budget, "method": "puzzle", **_q(measure(child, eval_ids, eval_ref)),
                     "predicted_kl": best.objective, "detail": " ".join(best.layer_labels())})
        if controls:
            rows += [{**row, "predicted_kl": best.objective}
                     for row in _with_refit(child_bld("puzzle_child_bld", child, budget, "the MIP's optimum"))]
        del child
        t0 = time.perf_counter()
        sols = diverse_solutions(problem, k, min_fraction=0.1, backend=plan.value("solver"))
        fin = measure_finalists(lib, parent, sols, fin_ids, progress=progress)
        rho = score_fidelity(fin)
        table = pd.DataFrame([f.row() for f in fin]).assign(budget=budget["budget"], seed=seed, preset=base["preset"])
        fidelity.append(table)
        done: dict[int, tuple[dict[str, float], dict[str, Any]]] = {}  # MIP rank -> (before, after child BLD)
        for method, pool in (("puzzle_finalists", fin), ("puzzle_search", [f for f in fin if f.mip_rank < k_search])):
            pick = pool[0]  # fin is sorted by measured KL: the best of the first k_search is the search's choice
            if pick.mip_rank not in done:
                chosen = lib.assemble(blocks_from_list(pick.solution.block_configs()))
                q = _q(measure(chosen, eval_ids, eval_ref))
                done[pick.mip_rank] = (q, child_bld("", chosen, {}, f"MIP rank {pick.mip_rank}"))
                del chosen
            q, trained = done[pick.mip_rank]
            rows.append({**budget, "method": method, **q, "predicted_kl": pick.solution.objective,
                         "finalists": len(pool), "spearman": rho if method == "puzzle_finalists" else score_fidelity(pool),
                         "detail": f"MIP rank {pick.mip_rank} of {len(pool)} ({time.perf_counter() - t0:.0f} s for "
                                   f"{len(fin)}): " + " ".join(pick.solution.layer_labels())})
            rows += [{**row, **budget, "predicted_kl": pick.solution.objective}
                     for row in _with_refit({**trained, "method": f"{method}_child_bld"})]
        for name in ("shortgpt", "attention_removal"):
            choice = choose_baseline(name, problem, influence)
            if not choice.feasible:
                rows.append({**budget, "method": name, "detail": f"infeasible: {choice.detail}"})
                continue
            model = lib.assemble(blocks_from_list([block_dict(lab) for lab in choice.labels]))
            rows.append({**budget, "method": name, **_q(measure(model, eval_ids, eval_ref)), "detail": choice.detail})
            del model
        print(pd.DataFrame(rows)[[c for c in COLUMNS if c != "detail"]].tail(8).round(4).to_string(index=False))
    return pd.DataFrame(rows).reindex(columns=COLUMNS), pd.concat(fidelity, ignore_index=True)


def _with_refit(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A ``*_child_bld`` row, preceded by its ``*_child_refit`` row (the child after the refit, before the gradient
    steps) when child-aware BLD started with the refit."""
    row = dict(row)
    refit = row.pop("refit")
    if not refit:
        return [row]
    return [{**row, **refit, "method": row["method"].replace("_child_bld", "_child_refit")}, row]


def _merged(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """``new`` with the rows of ``path`` of other (preset, seed, ranks) triples (rows written before the ``ranks``
    column ran in one process)."""
    if not path.is_file():
        return new
    old = pd.read_csv(path)
    old["ranks"] = old["ranks"].fillna(1).astype(int) if "ranks" in old else 1
    new = new.assign(ranks=new["ranks"].fillna(1).astype(int)) if "ranks" in new else new.assign(ranks=1)
    key = ["preset", "seed", "ranks"]
    keep = ~old.set_index(key).index.isin(new.set_index(key).index.unique())
    return pd.concat([old[keep], new], ignore_index=True).reindex(columns=[c for c in COLUMNS if c in old or c in new]
                                                                  + [c for c in old if c not in COLUMNS])


def parse_fractions(text: str) -> list[float] | None:
    """``0.75,0.5`` -> [0.75, 0.5]; None unless every item is a keep-ratio strictly between 0 and 1."""
    try:
        fractions = [float(x) for x in text.split(",")]
    except ValueError:
        return None
    return fractions if fractions and all(0.0 < f < 1.0 for f in fractions) else None


def uniform_width(lib: Any, r: float) -> int:
    """The side library's FFN width for keep-ratio ``r`` (its space rounds ``r x parent`` to an integer)."""
    parent = lib.parent_config.blocks[0].ffn.intermediate_size
    widths = sorted({int(w.split(":")[1]) for w in lib.table.variant if w.startswith("swiglu:")})
    return min(widths, key=lambda w: abs(w - r * parent))


def _q(q: dict[str, float]) -> dict[str, float]:
    return {"kl": q["kl"], "ppl": q["ppl"], "top1": q["top1_agreement"]}


PRESET_TITLES = {
    "quick": "quick preset",
    "full+child-refit": "full preset as it ships",
    "quick+refit": "quick, --ffn-refit",
    "full": "full, before the child-stream refit",
    "full+refit": "full, --ffn-refit, no child-stream refit",
    "full+refit+child-refit": "full, --ffn-refit",
}
"""quality.csv's preset labels, in the order of the panels, with their titles."""

PLOT_LINES = (  # method, legend, matplotlib style
    ("puzzle_search_child_bld", "puzzle search's child", dict(color="C0", marker="*", ms=11, lw=2.2)),
    ("uniform_ffn", "uniform FFN pruning", dict(color="C1", marker="o", lw=1.6)),
    ("uniform_ffn_child_bld", "uniform pruning + the same child-aware BLD (control)",
     dict(color="C1", marker="o", mfc="white", ls="--", lw=1.2)),
    ("shortgpt", "ShortGPT (layer removal)", dict(color="C2", marker="s", lw=1.6)),
)


def _grid(n: int, *, width: float = 4.2, height: float = 3.4, **kw: Any) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 1.1), squeeze=False, **kw)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot(df: pd.DataFrame, fid: pd.DataFrame, path: Path) -> None:
    """``path``: one panel per preset, KL to the parent against decoder FLOPs for the search's child, uniform FFN
    pruning and ShortGPT (the mean over seeds, the band from the lowest to the highest seed). Beside it,
    ``<stem>_fidelity.png``: within each budget, the finalists' measured KL against the MIP's prediction."""
    import matplotlib.pyplot as plt

    data = df.dropna(subset=["kl"])
    ranks = data["ranks"].fillna(1) if "ranks" in data else pd.Series(1, index=data.index)
    sharded, data = data[ranks > 1], data[ranks == 1]  # the torchrun search's child: markers beside the lines
    presets = [p for p in PRESET_TITLES if p in set(data.preset)] + sorted(set(data.preset) - set(PRESET_TITLES))
    fig, axes = _grid(len(presets), sharex=True, sharey=True)
    drawn = [method for method, _, _ in PLOT_LINES]
    for ax, preset in zip(axes, presets):
        d = data[data.preset == preset]
        for method, label, style in PLOT_LINES:
            g = d[d.method == method].groupby("flops_pct").kl.agg(["mean", "min", "max"]).sort_index()
            if g.empty:
                continue
            ax.plot(g.index, g["mean"], label=label, **style)
            if d.seed.nunique() > 1:
                ax.fill_between(g.index, g["min"], g["max"], color=style["color"], alpha=0.25, lw=0)
        for n, g in sharded[(sharded.preset == preset) & (sharded.method == "puzzle_search_child_bld")].groupby("ranks"):
            ax.plot(g.flops_pct, g.kl, ls="none", marker="x", ms=10, mew=2, color="C3",
                    label=f"puzzle search's child on {int(n)} ranks (torchrun)")
        for x, y in d[d.method == "puzzle_search_child_bld"].groupby("flops_pct").kl.mean().items():
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, -13), ha="center", fontsize=8,
                        color="C0")
        seeds = d.seed.nunique()
        ax.set_title(f"{PRESET_TITLES.get(preset, preset)} ({seeds} seed{'s' * (seeds > 1)})", fontsize=10)
        ax.set(yscale="log", ylim=(0.6 * data.kl.min(), 1.6 * data[data.method.isin(drawn)].kl.max()))
        ax.set_yticks(ticks := [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20) if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]],
                      [f"{t:g}" for t in ticks])
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_xlabel("decoder FLOPs (% of the parent's)")
        ax.set_ylabel("KL to the parent")
        ax.label_outer()
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(3, len(handles)), frameon=False,
               fontsize=9)
    fig.suptitle("KL to the parent at equal decoder FLOPs, held-out text, before GKD (lower is better; "
                 "band: lowest to highest seed)", fontsize=11)
    fig.tight_layout(rect=(0, 0.09, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    plot_fidelity(fid, path.with_name(f"{path.stem}_fidelity.png"))


def plot_fidelity(fid: pd.DataFrame, path: Path) -> None:
    """One panel per budget: each finalist's predicted and measured KL, relative to the lowest of its search
    (preset, seed), so that the spreads of different presets share the axes."""
    import matplotlib.pyplot as plt

    budgets = sorted(fid.budget.unique(), reverse=True)
    presets = [p for p in PRESET_TITLES if p in set(fid.preset)] + sorted(set(fid.preset) - set(PRESET_TITLES))
    fig, axes = _grid(len(budgets), sharey=True)
    for ax, budget in zip(axes, budgets):
        for i, preset in enumerate(presets):
            d = fid[(fid.budget == budget) & (fid.preset == preset)]
            if d.empty:
                continue
            by = d.groupby("seed")
            x = 100 * (d.predicted_kl / by.predicted_kl.transform("min") - 1)
            y = 100 * (d.kl / by.kl.transform("min") - 1)
            ax.scatter(x, y, s=16, color=f"C{i}", alpha=0.75, label=PRESET_TITLES.get(preset, preset))
        ax.set_title(f"{100 * float(budget.split('=')[1]):.1f}% of the decoder FLOPs", fontsize=10)
        ax.set_xlabel("MIP's predicted KL, % above the lowest")
        ax.set_ylabel("measured KL, % above the lowest")
        ax.label_outer()
        ax.grid(alpha=0.3)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, len(handles)), frameon=False,
               fontsize=9)
    fig.suptitle("Within a budget the MIP's additive score cannot rank its finalists: predicted spread < 0.5%, "
                 "measured up to 38%", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from puzzle.search import search

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random parent, tiny sizes (under a minute)")
    ap.add_argument("--preset", default="quick", choices=["quick", "full"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fractions", default="0.75,0.5,0.25", help="FFN keep-ratios of the uniform pruning budgets")
    ap.add_argument("--finalists", type=int, default=None, help="MIP solutions measured per budget (default 24)")
    ap.add_argument("--child-bld-tokens", type=int, default=None,
                    help="tokens of child-aware BLD (default: the preset's; --quick: 1024)")
    ap.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                    help="also give child-aware BLD to uniform pruning and to the MIP's optimum (default: on)")
    ap.add_argument("--ffn-refit", action=argparse.BooleanOptionalAction, default=None, help="the search's library "
                    "with the least-squares refit of pruned FFNs (bld.ffn_refit; default: off); rows labelled PRESET+refit, "
                    "with uniform_ffn_refit rows")
    ap.add_argument("--child-refit", action=argparse.BooleanOptionalAction, default=None,
                    help="child-aware BLD starts with the child-stream refit (default: the preset's, full on, quick off; "
                    "--quick off); rows labelled PRESET+child-refit")
    ap.add_argument("--ranks", type=int, default=1, help="run `puzzle search` itself under torchrun on this many "
                    "processes and measure its child (benchmarks/quality_ranks.py: rows puzzle_search and "
                    "puzzle_search_child_bld with ranks = N); default 1: the in-process comparison")
    ap.add_argument("--plot-only", action="store_true", help="only redraw results/quality.png and "
                    "quality_fidelity.png from the committed CSVs (seconds; runs nothing)")
    ap.add_argument("--run", default=None, help="run directory (default runs/quality-PRESET-sSEED, "
                    "runs/quality-PRESET-refit-sSEED with --ffn-refit; quick: a temp dir)")
    args = ap.parse_args()
    if args.plot_only:
        plot(pd.read_csv(RESULTS / "quality.csv"), pd.read_csv(RESULTS / "quality_fidelity.csv"), RESULTS / "quality.png")
        print(f"wrote {RESULTS / 'quality.png'} and {RESULTS / 'quality_fidelity.png'}")
        return
    fractions = parse_fractions(args.fractions)
    if fractions is None:
        ap.error(f"--fractions must be comma-separated keep-ratios strictly between 0 and 1, got {args.fractions!r}")
    k = args.finalists if args.finalists is not None else (4 if args.quick else 24)
    if k < 1:
        ap.error("--finalists must be at least 1")
    from puzzle.search.config import PRESETS

    cb_tokens = args.child_bld_tokens if args.child_bld_tokens is not None else (
        1024 if args.quick else PRESETS[args.preset]["child_bld_tokens"])
    if cb_tokens < 1:
        ap.error("--child-bld-tokens must be at least 1")
    child_refit = args.child_refit if args.child_refit is not None else (
        False if args.quick else PRESETS[args.preset]["child_refit"])
    ffn_refit = bool(args.ffn_refit)
    if args.ranks < 1:
        ap.error(f"--ranks must be at least 1, got {args.ranks}")
    if args.ranks > 1 and ffn_refit:
        ap.error("--ranks N measures the search as it ships: drop --ffn-refit")
    t0 = time.perf_counter()
    if args.ranks > 1:
        return sharded_main(args, fractions, child_refit, t0)
    if args.quick:
        run_dir = Path(args.run or Path(tempfile.mkdtemp(prefix="puzzle-quality-")) / "run")
        write_tiny_parent(run_dir.parent / "parent") if not (run_dir.parent / "parent").exists() else None
    else:
        run_dir = Path(args.run or f"runs/quality-{args.preset}{'-refit' if ffn_refit else ''}-s{args.seed}")
    cfg = search_config(args.quick, args.preset, args.seed, str(run_dir.parent / "parent") if args.quick else None,
                        ffn_refit)
    search(cfg, run_dir, progress=not args.quick, echo=print)
    df, fid = compare(run_dir, quick=args.quick, preset=args.preset, seed=args.seed, fractions=fractions, k=k,
                      finalist_sequences=2 if args.quick else 4, eval_sequences=2 if args.quick else 8,
                      child_bld_tokens=cb_tokens, controls=args.controls, ffn_refit=ffn_refit,
                      child_refit=child_refit, progress=not args.quick)
    from puzzle.io import atomic_write_text

    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""  # *_quick.csv are not committed; the quick plot stays in the run
    if not args.quick:  # the rows of other presets and seeds stay
        df, fid = _merged(RESULTS / "quality.csv", df), _merged(RESULTS / "quality_fidelity.csv", fid)
    atomic_write_text(RESULTS / f"quality{suffix}.csv", df.to_csv(index=False))
    atomic_write_text(RESULTS / f"quality_fidelity{suffix}.csv", fid.to_csv(index=False))
    plot(df, fid, run_dir / "quality.png" if args.quick else RESULTS / "quality.png")
    print(df.drop(columns=["detail"]).round(4).to_string(index=False))
    print(f"wrote {RESULTS / f'quality{suffix}.csv'} in {time.perf_counter() - t0:.0f} s")


def sharded_main(args: argparse.Namespace, fractions: list[float], child_refit: bool, t0: float) -> None:
    """``--ranks N``: the search under torchrun, its child measured on quality.py's held-out text."""
    from benchmarks.quality_ranks import sharded_rows
    from puzzle.io import atomic_write_text
    from puzzle.parents.embedded import resolve_embedded

    label = ("quick-test" if args.quick else args.preset) + ("+child-refit" if child_refit else "")
    if args.quick:
        run_dir = Path(args.run or Path(tempfile.mkdtemp(prefix="puzzle-quality-")) / "run")
        model = run_dir.parent / "parent"
        write_tiny_parent(model) if not model.exists() else None
    else:
        run_dir = Path(args.run or f"runs/quality-{args.preset}-ranks{args.ranks}-s{args.seed}")
        model = resolve_embedded("smollm2-135m")
    rows = sharded_rows(run_dir, model=str(model), quick=args.quick, preset=args.preset, label=label, seed=args.seed,
                        ranks=args.ranks, fractions=fractions, child_refit=child_refit,
                        finalist_sequences=2 if args.quick else 4, eval_sequences=2 if args.quick else 8)
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    path = RESULTS / ("quality_quick.csv" if args.quick else "quality.csv")
    RESULTS.mkdir(exist_ok=True)
    df = _merged(path, df)
    atomic_write_text(path, df.to_csv(index=False))
    if not args.quick:
        plot(df, pd.read_csv(RESULTS / "quality_fidelity.csv"), RESULTS / "quality.png")
    print(df[df.ranks == args.ranks].drop(columns=["detail"]).round(4).to_string(index=False))
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
