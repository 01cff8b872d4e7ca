"""Baselines at the puzzle child's budget, built from the same library and given the same GKD.

Each baseline is a rule that picks one library variant per layer, cut just far enough that the
*same* budget constraints the MIP had (speedup / throughput / memory on the same target and
scenario, recomputed by the solvers' own checks) hold:

- ``uniform_ffn``: every layer keeps its attention and gets the same FFN variant, the widest one
  in the library that meets the budget (classic width pruning; the widths are the library's
  BLD-trained ones).
- ``shortgpt``: whole layers (attention and FFN) are removed in ascending order of Block
  Influence, ``BI_i = 1 - E_tokens cos(h_i, h_{i+1})`` on calibration text (Men et al. 2024,
  "ShortGPT"), until the budget holds.
- ``attention_removal``: attention sub-blocks are removed in ascending order of their own block
  influence, ``1 - E_tokens cos(x, x + attn(norm(x)))`` (He et al. 2024, "What matters in
  transformers? Not all attention is needed"), until the budget holds.

A rule that cannot meet the budget at all (removing every attention may not be enough) is
reported as infeasible with the best speedup it reaches; nothing is faked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from puzzle.search.settings import BASELINES

NO_OP = "no_op"


@dataclass(frozen=True)
class BaselineChoice:
    """The per-layer block labels a baseline rule picked, and whether they meet the budget."""

    name: str
    labels: tuple[str, ...]
    feasible: bool
    speedup: float | None
    """Predicted speedup of ``labels`` in the budget's scenario."""
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "labels": list(self.labels), "feasible": self.feasible,
                "speedup": self.speedup, "detail": self.detail}


# --------------------------------------------------------------------------------------- influence


@torch.no_grad()
def block_influence(model: Any, ids: torch.Tensor, *, chunk: int = 2) -> pd.DataFrame:
    """Per layer: ``layer_bi`` (ShortGPT) and ``attention_bi`` of ``model`` on ``ids`` ``(N, T)``.

    Both are ``1 - mean cos`` over every token of every sequence; a layer without attention has
    ``attention_bi`` NaN.
    """
    model.eval()
    n_layers = len(model.model.layers)
    layer_sum, attn_sum, count = [0.0] * n_layers, [0.0] * n_layers, 0
    for start in range(0, ids.shape[0], chunk):
        batch = ids[start:start + chunk]
        _, _, hidden = model.model(input_ids=batch, use_cache=False, output_hidden_states=True)
        # hidden: L + 1 tensors (B, T, H); hidden[i] is layer i's input
        positions = torch.arange(batch.shape[1])[None].expand(batch.shape[0], -1)
        cos, sin = model.model.rotary_emb(positions, hidden[0].dtype)
        ctx = {"cos": cos, "sin": sin, "mask": None, "cache": None}  # None: plain causal
        for i, layer in enumerate(model.model.layers):
            x, y = hidden[i].float(), hidden[i + 1].float()
            layer_sum[i] += F.cosine_similarity(x, y, dim=-1).sum().item()
            if layer.spec["attention"] != NO_OP:
                a = hidden[i] + layer.self_attn(layer.input_layernorm(hidden[i]), ctx)
                attn_sum[i] += F.cosine_similarity(x, a.float(), dim=-1).sum().item()
        count += batch.numel()
    rows = [{"layer": i, "layer_bi": 1.0 - layer_sum[i] / count,
             "attention_bi": (1.0 - attn_sum[i] / count) if layer.spec["attention"] != NO_OP else float("nan")}
            for i, layer in enumerate(model.model.layers)]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- rules


def _split(label: str) -> tuple[str, str]:
    attention, ffn = label.split("|")
    return attention, ffn


def _ffn_order(problem: Any) -> list[str]:
    """FFN labels present in every layer, widest (most parameters) first."""
    per_layer: list[set[str]] = [set() for _ in range(problem.num_layers)]
    size: dict[str, float] = {}
    for c in problem.candidates:
        if len(c.layers) == 1:
            ffn = _split(c.members[0])[1]
            per_layer[c.layers[0]].add(ffn)
            size[ffn] = max(size.get(ffn, 0.0), float(c.costs.get("params", 0.0)))
    common = set.intersection(*per_layer) if per_layer else set()
    return sorted(common, key=lambda f: (-size[f], f))


class _Labels:
    """Index of single-layer candidates by (layer, label), and the budget check of a label list."""

    def __init__(self, problem: Any) -> None:
        self.problem = problem
        self.index = {(c.layers[0], c.members[0]): i for i, c in enumerate(problem.candidates) if len(c.layers) == 1}
        self.parent = [problem.candidates[i].members[0] for i in problem.parent]

    def chosen(self, labels: Sequence[str]) -> list[int] | None:
        try:
            return [self.index[(layer, label)] for layer, label in enumerate(labels)]
        except KeyError:
            return None

    def speedup(self, labels: Sequence[str]) -> float | None:
        chosen = self.chosen(labels)
        return None if chosen is None else self.problem.totals(chosen).speedup

    def meets_budget(self, labels: Sequence[str]) -> bool:
        chosen = self.chosen(labels)
        if chosen is None:
            return False
        return all(c.check(self.problem, chosen).ok for c in self.problem.budget.constraints())


def uniform_ffn(problem: Any) -> BaselineChoice:
    lab = _Labels(problem)
    attention = [_split(p)[0] for p in lab.parent]
    tried = []
    for ffn in _ffn_order(problem):
        labels = [f"{a}|{ffn}" for a in attention]
        tried.append(ffn)
        if lab.meets_budget(labels):
            return BaselineChoice("uniform_ffn", tuple(labels), True, lab.speedup(labels), f"every FFN {ffn}")
    labels = [f"{a}|{tried[-1]}" for a in attention] if tried else lab.parent
    return BaselineChoice("uniform_ffn", tuple(labels), False, lab.speedup(labels),
                          f"no uniform FFN width meets the budget (tried {tried})")


def remove_in_order(problem: Any, name: str, order: Sequence[int], remove: Callable[[str], str]) -> BaselineChoice:
    """Apply ``remove`` to layers in ``order`` until the labels meet the budget."""
    lab = _Labels(problem)
    labels = list(lab.parent)
    if lab.meets_budget(labels):
        return BaselineChoice(name, tuple(labels), True, lab.speedup(labels), "the parent meets the budget")
    removed: list[int] = []
    for layer in order:
        if (layer, remove(labels[layer])) not in lab.index:  # not a candidate here (the engine left it out)
            continue
        labels[layer] = remove(labels[layer])
        removed.append(layer)
        if lab.meets_budget(labels):
            removed = sorted(removed)
            return BaselineChoice(name, tuple(labels), True, lab.speedup(labels), f"removed in layers {removed}")
    return BaselineChoice(name, tuple(labels), False, lab.speedup(labels),
                          f"removing all {len(order)} candidates in order does not meet the budget")


def choose_baseline(name: str, problem: Any, influence: pd.DataFrame) -> BaselineChoice:
    """The labels baseline ``name`` picks under ``problem``'s budget (its custom constraints are ignored)."""
    if name == "uniform_ffn":
        return uniform_ffn(problem)
    if name == "shortgpt":
        order = influence.sort_values(["layer_bi", "layer"])["layer"].tolist()
        return remove_in_order(problem, name, order, lambda label: f"{NO_OP}|{NO_OP}")
    if name == "attention_removal":
        rows = influence.dropna(subset=["attention_bi"]).sort_values(["attention_bi", "layer"])
        return remove_in_order(problem, name, rows["layer"].tolist(), lambda label: f"{NO_OP}|{_split(label)[1]}")
    raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")


def plot_baselines(df: pd.DataFrame, path: Path, title: str, scenario: str) -> None:
    """KL to the parent against predicted (and, when measured, measured) speedup, one point per model."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (a notebook's) is left alone

    cols = [c for c in (f"pred_{scenario}_speedup", f"meas_{scenario}_speedup") if c in df]
    fig = Figure(figsize=(4.2 * len(cols), 3.4))
    axes = fig.subplots(1, len(cols), squeeze=False)
    ok = df[df["feasible"].astype(bool) & df["kl_to_parent"].notna()] if "kl_to_parent" in df else df.iloc[:0]
    ok = ok[ok["model"] != "parent"]
    for ax, col in zip(axes[0], cols):
        for _, r in ok.iterrows():
            ax.scatter(r[col], r["kl_to_parent"], s=40, marker="*" if r["model"] == "puzzle" else "o")
            ax.annotate(r["model"], (r[col], r["kl_to_parent"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(col.replace("_", " "))
        ax.set_ylabel("KL to parent (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
