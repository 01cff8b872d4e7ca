"""``puzzle search`` end to end on a tiny parent: every stage, rerun skips, a budget change
re-solves only, and a run killed mid-BLD resumes without redoing finished stages."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
import torch

import block_library
from puzzle.loading import load_model
from puzzle.search import STAGES, SearchConfig, search

pytestmark = pytest.mark.slow  # whole searches on the tiny parent (about 20 s each)

TINY = dict(engine="transformers", budget="8xH100", speedup=1.2,  # the tiny parent's FFN 96 is no multiple of 256
            bld_tokens=4 * 8 * 256, score_sequences=1, score_seq_len=32,
            fuse_sequences=1, fuse_distill_steps=2, gkd_steps=2, gkd_batch=1, eval_sequences=1, measure_speed=False)


@pytest.fixture(scope="module")
def finished_run(tiny_text_parent, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "run"
    lines: list[str] = []
    run = search(SearchConfig(model=str(tiny_text_parent), **TINY), out, progress=False, echo=lines.append)
    return run, lines


def test_every_stage_runs_and_the_export_loads(finished_run, tiny_text_parent):
    run, lines = finished_run
    assert [line.split(":")[0] for line in lines] == [f"[{k}/{len(STAGES)}] {s}" for k, s in enumerate(STAGES, 1)]
    child = load_model(run.export_dir)
    solution = json.loads((run.directory / "solve" / "solution.json").read_text())
    assert solution["totals"]["speedup"] >= 1.2 - 1e-9
    report = run.report.set_index("model")
    assert list(report.index) == ["parent", "child"]
    assert report.loc["child", "pred_decode_speedup"] > 1.0 and report.loc["child", "kl_to_parent"] > 0
    assert report.loc["child", "layers"] == child.config.num_hidden_layers
    # quality by context: the tiny parent's rotary positions end at 256, so the served 1024 is not measured
    evaluation = json.loads((run.directory / "evaluate" / "evaluation.json").read_text())
    assert {c: q["sequences"] for c, q in evaluation["contexts"].items()} == {"256": 1}
    assert report.loc["child", "kl_256"] == report.loc["child", "kl_to_parent"] and report.loc["parent", "kl_256"] == 0
    assert (run.directory / "report.png").stat().st_size > 1000
    with torch.no_grad():
        assert torch.isfinite(child(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False).logits).all()


def test_the_best_measured_finalist_goes_on_and_its_replaced_subblocks_are_retrained(finished_run, tiny_text_parent):
    from block_library import open_library
    from puzzle.evaluation.quality import evaluate_quality
    from puzzle.schema import load_blocks
    from puzzle.search.finalists import finalist_ids
    from puzzle.loading import load_tokenizer

    run, _ = finished_run
    d = run.directory
    finalists = pd.read_csv(d / "solve" / "finalists.csv")  # the quick preset's 4, best measured first
    assert len(finalists) == 4 and list(finalists.kl) == sorted(finalists.kl) and finalists.mip_rank.nunique() == 4
    blocks = load_blocks(d / "solve" / "blocks.json")
    assert " ".join(f"{b.attention.label}|{b.ffn.label}" for b in blocks) == finalists.blocks[0]
    lib, parent = open_library(d / "library" / "lib"), load_model(str(tiny_text_parent))
    ids = finalist_ids(["stdlib"], load_tokenizer(str(tiny_text_parent)), skip=16, sequences=4)  # after the evaluation's
    assert evaluate_quality(lib.assemble(blocks), ids, parent=parent)["kl"] == pytest.approx(finalists.kl[0], rel=1e-5)
    # child-aware BLD: the chosen child's replaced sub-blocks only, 16,384 tokens (16 steps of 4 x 256)
    losses, out = pd.read_csv(d / "child_bld" / "losses.csv"), run.stages["child_bld"].outputs
    assert out["tokens"] == 16384 and out["steps"] == 16 and out["trained"] == losses.subblock.nunique() > 0
    assert len(losses) == 16 * out["trained"] and losses.train_nmse.notna().all()  # learning: tests/distill
    trained, assembled = load_model(str(d / "child_bld" / "child")), lib.assemble(blocks)
    moved = {k.split(".")[2] for k, v in trained.state_dict().items() if not torch.equal(v, assembled.state_dict()[k])}
    assert moved == {str(int(k[1:4])) for k in losses.subblock}  # the layers of the trained sub-blocks, no other


def test_rerun_skips_everything_and_a_new_budget_resolves_only(finished_run, tiny_text_parent):
    run, _ = finished_run
    lines: list[str] = []
    search(SearchConfig(model=str(tiny_text_parent), **TINY), run.directory, progress=False, echo=lines.append)
    assert all(line.endswith("skipped") for line in lines)
    lines.clear()
    search(SearchConfig(model=str(tiny_text_parent), **{**TINY, "speedup": 1.3}), run.directory, progress=False,
           echo=lines.append)
    skipped = [line.split()[1].rstrip(":") for line in lines if line.endswith("skipped")]
    assert skipped == ["library", "bld", "score", "profile"]


def test_killed_mid_bld_resumes_without_redoing_the_build(tiny_text_parent, tmp_path, monkeypatch, caplog):
    real = block_library.train_library

    def killed(*args, **kwargs):
        def on_step(step):
            if step == 2:
                raise KeyboardInterrupt  # as if the process were killed right after step 2's checkpoint
        return real(*args, **{**kwargs, "on_step": on_step})

    monkeypatch.setattr(block_library, "train_library", killed)
    cfg = SearchConfig(model=str(tiny_text_parent), **TINY)
    with pytest.raises(KeyboardInterrupt):
        search(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "library" / "stage.json").is_file()
    assert not (tmp_path / "run" / "bld" / "stage.json").exists()
    monkeypatch.setattr(block_library, "train_library", real)
    lines: list[str] = []
    with caplog.at_level(logging.INFO):
        search(cfg, tmp_path / "run", progress=False, echo=lines.append)
    assert lines[0].endswith("library: up to date, skipped")
    assert "resuming BLD at step 2" in caplog.text
    losses = pd.read_csv(tmp_path / "run" / "library" / "lib" / "bld" / "losses.csv")
    assert sorted(losses.step.unique()) == [1, 2, 3, 4]


def test_baselines_stage_meets_the_same_budget_with_the_same_gkd(finished_run, tiny_text_parent):
    from puzzle.search.baselines import BASELINES

    run, _ = finished_run
    cfg = SearchConfig(model=str(tiny_text_parent), **{**TINY, "baselines": BASELINES, "measure_speed": True})
    lines: list[str] = []
    search(cfg, run.directory, progress=False, echo=lines.append)
    assert lines[-1].startswith(f"[{len(STAGES) + 1}/{len(STAGES) + 1}] baselines: done")
    df = pd.read_csv(run.directory / "baselines" / "baselines.csv").set_index("model")
    assert list(df.index) == ["parent", "puzzle", *BASELINES]
    assert df.loc["parent", "kl_to_parent"] == 0 and df.loc["parent", "meas_decode_speedup"] == 1
    feasible = df[df.feasible].drop(index="parent")
    assert "puzzle" in feasible.index and len(feasible) >= 2
    assert (feasible.pred_decode_speedup >= 1.2 - 1e-6).all()
    assert (feasible.kl_to_parent > 0).all() and (feasible.meas_decode_speedup > 0).all()
    speed = pd.read_csv(run.directory / "baselines" / "speed.csv")
    assert set(speed.model) == {"parent", *feasible.index}
    assert (feasible.meas_decode_tokens_per_s > 0).all()
    for name in feasible.index.drop("puzzle"):  # the distilled child is the rule's architecture, GKD'd as puzzle's
        sub = next((run.directory / "baselines").glob(f"{name}-*"))
        labels = json.loads((sub / "choice.json").read_text())["labels"]
        child = load_model(sub / "child")
        assert [b.label for b in child.config.blocks] == labels
        assert len(pd.read_csv(sub / "gkd" / "curve.csv")) >= 1
    assert (run.directory / "baselines" / "baselines.png").stat().st_size > 1000
    lines.clear()
    search(cfg, run.directory, progress=False, echo=lines.append)
    assert all(line.endswith("skipped") for line in lines)


# ------------------------------------------------------------------------------ honest run directories


def _hashes(root):
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _ran(lines):
    return [line.split()[1].rstrip(":") for line in lines if not line.endswith("skipped")]


@pytest.fixture(scope="module")
def pristine_run(tiny_text_parent, tmp_path_factory):
    """A finished run that no test changes (the tests below work on copies of it)."""
    out = tmp_path_factory.mktemp("pristine") / "run"
    return search(SearchConfig(model=str(tiny_text_parent), **TINY), out, progress=False).directory


@pytest.fixture
def copied_run(pristine_run, tmp_path):
    import shutil

    shutil.copytree(pristine_run, tmp_path / "copy")
    return pristine_run, tmp_path / "copy"


def test_a_copied_run_reruns_fully_skipped_without_touching_the_original(copied_run, tiny_text_parent):
    from puzzle.search import planned_stages, resolve

    original, copy = copied_run
    before = _hashes(original)
    plan = resolve(SearchConfig(model=str(tiny_text_parent), **TINY))
    assert [r["action"] for r in planned_stages(plan, copy, verify=True)] == ["skip"] * len(STAGES)
    leftover = copy / "library" / ".lib.building"  # as an interrupted library build leaves it
    (leftover / "init").mkdir(parents=True)
    (leftover / "init" / "L000.safetensors").write_bytes(b"\0" * 4096)
    lines: list[str] = []
    again = search(SearchConfig(model=str(tiny_text_parent), **TINY), copy, progress=False, echo=lines.append)
    assert _ran(lines) == [] and len(lines) == len(STAGES)
    assert not leftover.exists()  # hidden temporaries of interrupted writes are cleaned up on start
    assert _hashes(original) == before
    assert str(again.export_dir).startswith(str(copy)) and again.export_dir.is_dir()
    manifest = json.loads((copy / "score" / "stage.json").read_text())
    assert not any(str(original) in json.dumps(v) for v in manifest["outputs"].values())  # relative paths only


@pytest.mark.parametrize("damage, expected", [
    ("score/scores/scores.csv", ["score", "solve", "child_bld", "fuse", "gkd", "export", "evaluate"]),
    ("export/model/model.safetensors", ["export", "evaluate"]),
    ("library/stage.json", list(STAGES)),
])
def test_a_damaged_stage_redoes_exactly_it_and_the_stages_that_read_it(copied_run, tiny_text_parent, damage,
                                                                          expected):
    _, copy = copied_run
    path = copy / damage
    if path.suffix == ".safetensors":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    else:
        path.unlink()
    lines: list[str] = []
    search(SearchConfig(model=str(tiny_text_parent), **TINY), copy, progress=False, echo=lines.append)
    assert _ran(lines) == expected
    if damage != "library/stage.json":
        assert any(damage in line for line in lines), lines  # the message names the damaged file
    lib = block_library.open_library(copy / "library" / "lib")
    assert lib.status == "trained"  # a rebuilt library is trained again before anything reads it
    lines.clear()
    search(SearchConfig(model=str(tiny_text_parent), **TINY), copy, progress=False, echo=lines.append)
    assert _ran(lines) == []


def test_refinement_rounds_resolve_only_and_the_lowest_measured_child_goes_on(finished_run, tiny_text_parent):
    run, _ = finished_run
    lines: list[str] = []
    cfg = SearchConfig(model=str(tiny_text_parent), **{**TINY, "refine_rounds": 2, "gkd_steps": 0})
    search(cfg, run.directory, progress=False, echo=lines.append)
    skipped = [line.split()[1].rstrip(":") for line in lines if line.endswith("skipped")]
    assert skipped == ["library", "bld", "score", "profile"]
    fin = pd.read_csv(run.directory / "solve" / "finalists.csv")
    first, refined = fin[fin["round"].isna()], fin[fin["round"].notna()]
    assert len(first) == 4 and len(refined) <= 2 and list(refined["round"]) == list(range(len(refined)))
    assert set(refined.mip_rank) == set(range(4, 4 + len(refined)))
    assert not set(refined.blocks) & set(first.blocks)  # each a new child
    out = json.loads((run.directory / "solve" / "stage.json").read_text())
    assert out["outputs"]["kl"] == pytest.approx(fin.kl.min()) and out["outputs"]["finalists"] == len(fin)
    assert (refined.context_predicted_kl > 0).all() and (refined.seconds > 0).all()
