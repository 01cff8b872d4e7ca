"""The tables of a scoring run, built from the per-layer records, and its cost accounting.

A record (``partial/L007.json``) holds the measured blocks of one layer, each as
``{attention, ffn, kl, loss_delta, top1_agreement, tokens}``. :func:`block_table` completes the
A x F grid of every layer: a block not measured (``pairs="additive"``, both halves differ from
the parent's) scores the sum of ``a|F_parent`` and ``A_parent|f``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from block_library.artifact import Library

SCORE_COLUMNS = ["layer", "variant", "is_parent", "kl", "loss_delta", "top1_disagreement", "scored"]
SUBBLOCK_COLUMNS = ["layer", "subblock", "variant", "kl", "loss_delta", "top1_agreement"]


def parent_labels(lib: Library, layer: int) -> tuple[str, str]:
    """The parent's own (attention, FFN) labels at ``layer``."""
    t = lib.table
    rows = t[(t.layer == layer) & t.is_parent.astype(bool)].set_index("subblock").variant
    return str(rows["attention"]), str(rows["ffn"])


def _measured(record: dict[str, Any]) -> dict[tuple[str, str], dict[str, float]]:
    return {(r["attention"], r["ffn"]): {"kl": r["kl"], "loss_delta": r["loss_delta"],
                                         "top1_disagreement": 1.0 - r["top1_agreement"]} for r in record["rows"]}


def block_table(lib: Library, records: dict[int, dict[str, Any]]) -> pd.DataFrame:
    """The solvers' scores table (solvers/io.py): every (layer, ``ATTENTION|FFN``) of the library."""
    out = []
    for layer in sorted(records):
        pa, pf = parent_labels(lib, layer)
        got = _measured(records[layer])
        for a in lib.labels(layer, "attention"):
            for f in lib.labels(layer, "ffn"):
                if (a, f) in got:
                    s, how = got[(a, f)], "measured"
                else:  # first-order estimate: the two halves' losses add up
                    s = {k: got[(a, pf)][k] + got[(pa, f)][k] for k in got[(a, pf)]}
                    how = "additive"
                out.append({"layer": layer, "variant": f"{a}|{f}", "is_parent": a == pa and f == pf, **s, "scored": how})
    return pd.DataFrame(out, columns=SCORE_COLUMNS)


def subblock_table(lib: Library, records: dict[int, dict[str, Any]], *, initial: bool = False) -> pd.DataFrame:
    """One row per sub-block variant: the block with it and the parent's other half, plus its NMSE."""
    nmse = "init_val_nmse" if initial else "final_val_nmse"
    t = lib.table.set_index(["layer", "subblock", "variant"])
    out = []
    for layer in sorted(records):
        pa, pf = parent_labels(lib, layer)
        by_pair = {(r["attention"], r["ffn"]): r for r in records[layer]["rows"]}
        for sub in ("attention", "ffn"):
            for label in lib.labels(layer, sub):
                r = by_pair[(label, pf) if sub == "attention" else (pa, label)]
                out.append({"layer": layer, "subblock": sub, "variant": label, "kl": r["kl"],
                            "loss_delta": r["loss_delta"], "top1_agreement": r["top1_agreement"],
                            nmse: float(t.loc[(layer, sub, label), nmse])})
    return pd.DataFrame(out, columns=SUBBLOCK_COLUMNS + [nmse])


def cost_summary(records: dict[int, dict[str, Any]], num_layers: int) -> dict[str, Any]:
    """Layer forwards and LM-head evaluations run (the parent pass included) vs one full forward each.

    A replacement at layer l runs its block and the L - 1 - l layers after it: L - l layer forwards
    and one head; the naive way runs L layers and the head per replacement. Both count the parent's
    reference pass once (L layers + head).
    """
    reps = sum(r["cost"]["replacements"] for r in records.values())
    lf = num_layers + sum(r["cost"]["layer_forwards"] for r in records.values())
    he = 1 + sum(r["cost"]["head_evals"] for r in records.values())
    naive_lf, naive_he = num_layers * (reps + 1), reps + 1
    return {"replacements": reps, "layer_forwards": lf, "head_evals": he, "naive_layer_forwards": naive_lf,
            "naive_head_evals": naive_he, "layer_forward_ratio": round(naive_lf / lf, 3)}


def cost_line(manifest: dict[str, Any]) -> str:
    c, s = manifest["cost"], manifest.get("seconds", {})
    return (f"cost: {c['replacements']} replacements; {c['layer_forwards']:,} layer forwards + {c['head_evals']} "
            f"LM-head evaluations vs naive {c['naive_layer_forwards']:,} + {c['naive_head_evals']} "
            f"({c['layer_forward_ratio']:.2f}x fewer layer forwards); wall {s.get('wall_this_run', 0):.1f} s this run")


def format_subblocks(subs: pd.DataFrame, *, layer: int | None = None) -> str:
    """The human table: layer, sub-block, variant, kl, loss_delta, top1 (library order within a sub-block)."""
    t = subs if layer is None else subs[subs.layer == layer]
    t = t.rename(columns={"top1_agreement": "top1"}).copy()
    for c in ("kl", "loss_delta"):
        t[c] = t[c].map(lambda v: f"{v:.5f}")
    t["top1"] = t["top1"].map(lambda v: f"{v:.4f}")
    nmse = [c for c in t.columns if c.endswith("_val_nmse")]
    for c in nmse:
        t[c] = t[c].map(lambda v: f"{v:.5f}")
    return t[["layer", "subblock", "variant", "kl", "loss_delta", "top1", *nmse]].to_string(index=False)
