"""Replace-1-block scoring on a tiny trained library: the cached-activation path equals assembling
the child and running it whole; additive sums; resume; bad input; the solver reads the table."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from block_library import open_library
from puzzle.errors import ConfigError, ModelFilesError, NumericalError, StaleArtifactError
from puzzle.schema import BlockConfig
from puzzle.scoring import ScoreConfig, compare_logits, score_library
from puzzle.scoring import replace1
from puzzle.scoring.replace1 import load_ids

from .conftest import TINY_SCORE

L, A, F = 3, 4, 8  # layers; attention and FFN variants per layer (tiny_config's space)


def _child_metrics(lib_dir, layer: int, label: str) -> dict[str, float]:
    """The slow, obvious way: assemble the whole child from the library and run it end to end."""
    from block_library.space import parse_variant

    lib = open_library(lib_dir)
    ids = load_ids(lib, ScoreConfig(**TINY_SCORE))
    blocks = list(lib.parent_config.blocks)
    a, f = label.split("|")
    blocks[layer] = BlockConfig(attention=parse_variant(a, "attention"), ffn=parse_variant(f, "ffn"))
    with torch.no_grad():
        parent = lib.assemble(lib.parent_config.blocks)(ids).logits
        child = lib.assemble(blocks)(ids).logits
    return compare_logits(parent, child, ids)


def _row(scores: pd.DataFrame, layer: int, label: str) -> pd.Series:
    return scores[(scores.layer == layer) & (scores.variant == label)].iloc[0]


@pytest.mark.parametrize("layer,label", [(0, "gqa:1|swiglu:96"), (1, "gqa:2|swiglu:32"), (2, "no_op|swiglu:96"),
                                         (1, "linear|swiglu:64"), (0, "no_op|no_op")])
def test_exact_scores_equal_the_assembled_child(scored_exact, tiny_library, layer, label):
    ref, row = _child_metrics(tiny_library, layer, label), _row(scored_exact.scores, layer, label)
    assert row.scored == "measured"
    assert row.kl == pytest.approx(ref["kl"], rel=1e-4, abs=1e-6)
    assert row.loss_delta == pytest.approx(ref["loss_delta"], rel=1e-4, abs=1e-6)
    assert row.top1_disagreement == pytest.approx(1 - ref["top1_agreement"], abs=1e-9)


def test_additive_scores_measure_halves_and_sum_the_rest(scored_additive, scored_exact, tiny_library):
    s, e = scored_additive.scores, scored_exact.scores
    assert len(s) == len(e) == L * A * F
    assert (e.scored == "measured").all()
    assert (s.scored == "measured").sum() == L * (A + F - 1)
    # Measured halves agree with the exact mode (same code path; exact mode stacked 3 per batch).
    both = s.merge(e, on=["layer", "variant"], suffixes=("", "_exact"))
    m = both[both.scored == "measured"]
    assert (m.kl - m.kl_exact).abs().max() < 1e-6
    ref = _child_metrics(tiny_library, 1, "gqa:1|swiglu:96")
    assert _row(s, 1, "gqa:1|swiglu:96").kl == pytest.approx(ref["kl"], rel=1e-4, abs=1e-6)
    # A block whose halves both differ is the sum of its halves.
    for col in ("kl", "loss_delta", "top1_disagreement"):
        combo = _row(s, 2, "linear|swiglu:48")[col]
        assert combo == pytest.approx(_row(s, 2, "linear|swiglu:96")[col] + _row(s, 2, "gqa:2|swiglu:48")[col])
    assert _row(s, 2, "linear|swiglu:48").scored == "additive"


def test_parent_block_scores_exactly_zero(scored_additive, scored_exact):
    for result in (scored_additive, scored_exact):
        p = result.scores[result.scores.is_parent]
        assert list(p.layer) == [0, 1, 2] and set(p.variant) == {"gqa:2|swiglu:96"}
        assert (p.kl == 0).all() and (p.loss_delta == 0).all() and (p.top1_disagreement == 0).all()


def test_tables_and_manifest(scored_additive, tiny_library):
    out = scored_additive.directory
    subs = pd.read_csv(out / "subblock_scores.csv")
    assert list(subs.columns) == ["layer", "subblock", "variant", "kl", "loss_delta", "top1_agreement", "final_val_nmse"]
    assert len(subs) == L * (A + F)
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "score" and m["status"] == "complete" and m["library"]["weights"] == "trained"
    assert m["tokens"] == {"sequences": 3, "seq_len": 64, "tokens": 192, "scored_positions": 189}
    c = m["cost"]
    assert c["replacements"] == L * (A + F - 1)
    # Parent pass (L + head) plus, per replacement at layer l, L - l layers and one head.
    assert c["layer_forwards"] == L + (A + F - 1) * (3 + 2 + 1)
    assert c["naive_layer_forwards"] == L * (c["replacements"] + 1) and c["head_evals"] == c["replacements"] + 1
    assert not (tiny_library / "partial").exists()  # the library is never written


def test_the_solver_reads_the_scores_table(scored_additive):
    from solvers.io import problem_from_tables

    scores = pd.read_csv(scored_additive.directory / "scores.csv")
    costs = scores[["layer", "variant"]].assign(params=1.0 + scores.index % 5)
    problem = problem_from_tables(scores, costs, score_column="kl")
    assert len(problem.candidates) == L * A * F


def test_resume_after_an_interruption_skips_finished_layers(scored_additive, tiny_library, tmp_path, monkeypatch):
    calls = []
    real = replace1.score_layer
    monkeypatch.setattr(replace1, "score_layer", lambda *a, **k: calls.append(a[3]) or real(*a, **k))

    def stop_after_layer_1(layer):
        if layer == 1:
            raise KeyboardInterrupt

    out = tmp_path / "scores"
    with pytest.raises(KeyboardInterrupt):
        score_library(tiny_library, out, ScoreConfig(**TINY_SCORE), progress=False, on_layer=stop_after_layer_1)
    assert calls == [0, 1] and sorted(p.name for p in (out / "partial").iterdir()) == ["L000.json", "L001.json"]
    assert not (out / "scores.csv").exists()
    resumed = score_library(tiny_library, out, ScoreConfig(**TINY_SCORE), progress=False)
    assert calls == [0, 1, 2]
    pd.testing.assert_frame_equal(resumed.scores, scored_additive.scores)
    pd.testing.assert_frame_equal(resumed.subblocks, scored_additive.subblocks)
    # A finished directory with the same inputs: nothing recomputed, the same tables.
    again = score_library(tiny_library, out, ScoreConfig(**TINY_SCORE), progress=False)
    assert calls == [0, 1, 2]
    pd.testing.assert_frame_equal(again.scores.reset_index(drop=True), resumed.scores, check_dtype=False)


def test_changed_inputs_are_an_error_unless_forced(scored_additive, tiny_library, tmp_path):
    out = tmp_path / "scores"
    shutil.copytree(scored_additive.directory, out)
    with pytest.raises(StaleArtifactError, match="data spec"):
        score_library(tiny_library, out, ScoreConfig(**{**TINY_SCORE, "seq_len": 32}), progress=False)
    with pytest.raises(StaleArtifactError, match="pairs mode"):
        score_library(tiny_library, out, ScoreConfig(**TINY_SCORE, pairs="exact"), progress=False)
    lib2 = tmp_path / "lib2"
    shutil.copytree(tiny_library, lib2)
    index = (lib2 / "index.csv").read_text().splitlines()
    (lib2 / "index.csv").write_text("\n".join(index[:1] + [index[1].replace("0.0", "0.5", 1)] + index[2:]) + "\n")
    with pytest.raises(StaleArtifactError, match="the library"):
        score_library(lib2, out, ScoreConfig(**TINY_SCORE), progress=False)
    forced = score_library(tiny_library, out, ScoreConfig(**{**TINY_SCORE, "seq_len": 32}), force=True, progress=False)
    assert forced.manifest["tokens"]["seq_len"] == 32


def test_bad_input_is_a_clear_error(scored_additive, tiny_library, tmp_path, monkeypatch):
    with pytest.raises(ModelFilesError, match="not a block library"):
        score_library(tmp_path, tmp_path / "scores", ScoreConfig(**TINY_SCORE), progress=False)
    with pytest.raises(ConfigError, match="inside the library"):
        score_library(tiny_library, tiny_library / "scores", ScoreConfig(**TINY_SCORE), progress=False)
    with pytest.raises(ConfigError, match="pairs"):
        ScoreConfig(pairs="both")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="no scores manifest"):
        score_library(tiny_library, tmp_path / "other", ScoreConfig(**TINY_SCORE), progress=False)

    from block_library.artifact import Library

    real = Library.variant_state

    def poisoned(self, layer, subblock, label, **kw):
        state = real(self, layer, subblock, label, **kw)
        if (layer, subblock, label) == (1, "ffn", "swiglu:48"):
            state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
        return state

    monkeypatch.setattr(Library, "variant_state", poisoned)
    with pytest.raises(NumericalError, match=r"layer 1, block gqa:2\|swiglu:48"):
        score_library(tiny_library, tmp_path / "nan", ScoreConfig(**TINY_SCORE), progress=False)


def test_initial_weights_and_the_cli(tiny_library, scored_additive, tmp_path, capsys):
    from puzzle.cli.main import main

    out = tmp_path / "cli"
    assert main(["score", str(tiny_library), "--out", str(out), "--seq-len", "64", "--sequences", "3",
                 "--initial", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "init_val_nmse" in text and "layer forwards" in text and "initial weights" in text
    initial = pd.read_csv(out / "scores.csv")
    trained = scored_additive.scores
    assert (initial.kl.values != trained.kl.values).any() and (initial[initial.is_parent].kl == 0).all()
    assert main(["score", str(tiny_library), "--out", str(out), "--no-progress"]) == 2  # other inputs
    assert "--force" in capsys.readouterr().err
