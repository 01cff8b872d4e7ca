"""The scores and costs tables the search reads, and the files it writes.

Both tables are long format, one row per candidate, CSV (``.csv``) or Parquet (``.parquet``,
``.pq``). Key columns, in both:

==================== ========================================================================
``layer``            int >= 0: the first layer the candidate covers
``span``             int >= 1, optional (default 1): how many consecutive layers it covers,
                     ``layer .. layer + span - 1`` (a fused FFN run, say)
``variant``          the block label ``ATTENTION|FFN``: ATTENTION is ``gqa:K`` (K KV heads),
                     ``linear`` or ``no_op``; FFN is ``swiglu:M`` (width M), ``linear`` or
                     ``no_op`` (``gqa:8|swiglu:14336``). For ``span`` > 1: one label (every
                     covered layer has that block) or ``span`` labels joined with ``+``, in
                     layer order (``no_op|swiglu:4096+no_op|swiglu:4096``)
==================== ========================================================================

Scores table: the keys plus one numeric column per score, a quality loss where lower is better
(``kl``, ``loss_delta``, ...; the search minimizes the sum of one of them). Every value of the
chosen score column must be finite and >= 0 (a negative ``loss_delta``, a child that beat its
parent on the scored tokens, must be clipped to 0 first).

Costs table: the keys plus numeric cost columns:

==================== ========================================================================
``params``           parameters of the candidate
``weight_bytes``     bytes of its weights as served
``kv_bytes_per_token`` KV-cache bytes per token of context per sequence (0 without attention)
``<scenario>_ms``    milliseconds per step of one model copy in a serving scenario, e.g.
                     ``decode_ms`` at the scenario's batch and length (any number of scenarios;
                     see :class:`solvers.scenario.Scenario`)
``is_parent``        bool, optional here or in the scores table: the parent's own block; one
                     single-layer candidate per layer (needed for speedups and ``layer[i] == parent``)
==================== ========================================================================

A costs row with ``layer`` = -1 and ``variant`` = ``fixed`` holds what every model pays
(embeddings, LM head, final norm, per-step overhead) in the same cost columns; without it those
are 0. Every other column that is not numeric becomes an attribute custom constraints can test.
Each (layer, span, variant) appears once per table and both tables list the same candidates;
a column present in both must agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from solvers.errors import TableError
from solvers.files import atomic_write_text
from solvers.problem import Candidate, Problem

KEYS = ["layer", "span", "variant"]
FIXED = "fixed"


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a CSV or Parquet table; :class:`TableError` says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"table {path} does not exist")
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path)
        if path.suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except Exception as e:  # pandas raises many types for a malformed file
        raise TableError(f"{path} could not be read: {e}") from None
    raise TableError(f"{path}: unknown table format {path.suffix!r}; use .csv or .parquet")


def _first_key(rows: pd.DataFrame) -> list:
    """``[layer, span, variant]`` of the first row, as plain Python values (for messages)."""
    row = rows.iloc[0]
    return [int(row["layer"]), int(row["span"]), str(row["variant"])]


def _normalize(df: pd.DataFrame, what: str) -> pd.DataFrame:
    missing = [k for k in ("layer", "variant") if k not in df.columns]
    if missing:
        raise TableError(f"{what} table lacks the key column(s) {missing}; it has {list(df.columns)}")
    df = df.copy()
    if "span" not in df.columns:
        df["span"] = 1
    for k in ("layer", "span"):
        if df[k].isna().any() or not pd.api.types.is_integer_dtype(df[k]):
            raise TableError(f"{what} table: column {k!r} must hold integers, got {df[k].dtype}")
    df["variant"] = df["variant"].astype(str).str.strip()
    dup = df[df.duplicated(KEYS, keep=False)]
    if len(dup):
        raise TableError(f"{what} table lists a candidate twice: {_first_key(dup)}")
    if "is_parent" in df.columns:
        df["is_parent"] = df["is_parent"].map(_as_bool)
    return df


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        if v.strip().lower() in ("true", "1", "yes"):
            return True
        if v.strip().lower() in ("false", "0", "no", ""):
            return False
        raise TableError(f"is_parent must be true or false, got {v!r}")
    return bool(v) if not pd.isna(v) else False


def _merge(scores: pd.DataFrame, costs: pd.DataFrame) -> pd.DataFrame:
    both = [c for c in scores.columns if c in costs.columns and c not in KEYS]
    merged = scores.merge(costs, on=KEYS, how="outer", suffixes=("", "__costs"), indicator=True)
    for side, label in (("left_only", "scores"), ("right_only", "costs")):
        rows = merged[merged["_merge"] == side]
        if len(rows):
            other = "costs" if label == "scores" else "scores"
            raise TableError(f"{len(rows)} candidate(s) are in the {label} table but not the {other} table, "
                             f"e.g. {_first_key(rows)}")
    for c in both:
        if not merged[c].equals(merged[c + "__costs"]):
            raise TableError(f"column {c!r} is in both tables with different values")
    return merged.drop(columns=[c + "__costs" for c in both] + ["_merge"])


def _check_numeric(df: pd.DataFrame, what: str, *, column: str | None = None) -> None:
    """Refuse text in a column that is meant to hold numbers, naming its first such row.

    A column pandas did not read as numbers is an attribute (custom constraints test it) unless it is
    ``column`` (the score column asked for) or holds numbers on some rows: then a stray word or a typo made
    the whole column text, and reading it as an attribute would report it as missing."""
    for c in df.columns:
        if c in KEYS or c == "is_parent" or pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]):
            continue
        numbers = pd.to_numeric(df[c], errors="coerce")
        text = df[c].notna() & numbers.isna()
        if text.any() and (c == column or numbers.notna().any()):
            at = int(text.to_numpy().nonzero()[0][0])
            row = df.iloc[at]
            raise TableError(f"{what} table: column {c!r} holds non-numbers at row {at + 1} (layer {row['layer']}, "
                             f"variant {str(row['variant']).strip()!r}): {row[c]!r}; write a number there")


def _check_scores(scores: pd.DataFrame, column: str) -> None:
    """Refuse a negative, NaN or infinite value in the chosen score column, naming its first row."""
    values = scores[column].astype(float)
    bad = scores[~((values >= 0) & (values < float("inf")))]  # NaN fails both comparisons
    if len(bad):
        row = bad.iloc[0]
        span = "" if int(row["span"]) == 1 else f", span {int(row['span'])}"
        raise TableError(f"scores table: layer {int(row['layer'])}{span}, variant {row['variant']!r} has "
                         f"{column} = {float(row[column])!r}; scores must be finite and >= 0 (a quality loss, "
                         f"lower is better): fix the row or choose another score column")


def _members(layer: int, span: int, variant: str) -> tuple[str, ...]:
    parts = [p.strip() for p in variant.split("+")]
    if len(parts) == 1:
        return tuple(parts * span)
    if len(parts) != span:
        raise TableError(f"layer {layer} span {span}: variant {variant!r} has {len(parts)} '+'-joined labels")
    return tuple(parts)


def problem_from_tables(scores: pd.DataFrame, costs: pd.DataFrame, *, score_column: str | None = None,
                        **problem_fields: Any) -> Problem:
    """Build a :class:`Problem` from the two tables (format above); other fields pass through."""
    scores, costs = _normalize(scores, "scores"), _normalize(costs, "costs")
    _check_numeric(scores, "scores", column=score_column)
    _check_numeric(costs, "costs")
    is_fixed = (costs["layer"] == -1) & (costs["variant"] == FIXED)
    fixed_rows, costs = costs[is_fixed], costs[~is_fixed]
    score_cols = [c for c in scores.columns if c not in KEYS and c != "is_parent"
                  and pd.api.types.is_numeric_dtype(scores[c])]
    cost_cols = [c for c in costs.columns if c not in KEYS and c != "is_parent"
                 and pd.api.types.is_numeric_dtype(costs[c])]
    if score_column is None:
        if len(score_cols) != 1:
            raise TableError(f"choose a score column; the scores table has {score_cols}")
        score_column = score_cols[0]
    if score_column not in score_cols:
        raise TableError(f"unknown score column {score_column!r}; the scores table has {score_cols}")
    _check_scores(scores, score_column)
    merged = _merge(scores, costs)
    attr_cols = [c for c in merged.columns if c not in KEYS and c not in score_cols and c not in cost_cols]
    for col in score_cols + cost_cols:
        bad = merged[merged[col].isna()]
        if len(bad):
            raise TableError(f"column {col!r} has no value for {_first_key(bad)}")
    candidates = []
    for row in merged.sort_values(["layer", "span", "variant"]).to_dict("records"):
        layer, span = int(row["layer"]), int(row["span"])
        if layer < 0 or span < 1:
            raise TableError(f"layer {layer} span {span}: layer must be >= 0 and span >= 1")
        members = _members(layer, span, row["variant"])
        ident = f"{layer}:{'+'.join(members)}" if span == 1 else f"{layer}-{layer + span - 1}:{'+'.join(members)}"
        candidates.append(Candidate(
            id=ident, layers=tuple(range(layer, layer + span)), members=members,
            costs={c: float(row[c]) for c in cost_cols}, scores={c: float(row[c]) for c in score_cols},
            attrs={c: row[c] for c in attr_cols if not (isinstance(row[c], float) and pd.isna(row[c]))}))
    fixed = {c: float(fixed_rows[c].iloc[0]) for c in cost_cols if len(fixed_rows) and pd.notna(fixed_rows[c].iloc[0])}
    return Problem(candidates=tuple(candidates), score_column=score_column, fixed=fixed, **problem_fields)


def read_problem(scores_path: str | os.PathLike, costs_path: str | os.PathLike, **kwargs: Any) -> Problem:
    """:func:`problem_from_tables` on two files."""
    return problem_from_tables(read_table(scores_path), read_table(costs_path), **kwargs)


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
