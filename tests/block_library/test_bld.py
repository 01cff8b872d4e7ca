"""BLD on a tiny parent that reads real text: losses drop, resume is exact, sharding is exact, assembly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from block_library import LibraryConfig, build_library, open_library, train_library
from block_library.bld import lr_at
from puzzle.errors import ConfigError, CorruptArtifactError, ModelFilesError, NumericalError, SchemaError
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tiny_text_parent, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lib") / "built"
    build_library(str(tiny_text_parent), out, tiny_config(), progress=False)
    return out


@pytest.fixture(scope="module")
def trained(built, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lib") / "trained"
    shutil.copytree(built, out)
    train_library(out, progress=False)
    return out


@pytest.mark.slow  # builds or trains a library
def test_build_writes_the_table_and_files(built):
    lib = open_library(built)
    t = lib.table
    assert lib.status == "initialized"
    assert len(t) == 3 * (4 + 8)  # per layer: gqa:2 gqa:1 linear no_op | 96 80 64 48 32 16 linear no_op
    assert set(t[t.is_parent].variant) == {"gqa:2", "swiglu:96"}
    assert (t[t.is_parent].init_val_nmse == 0).all()
    assert (t[~t.is_parent].init_val_nmse > 0).all()
    assert all((built / f).is_file() for f in t.file if f)
    # A narrower FFN initialization is worse than a wider one on every layer.
    for layer in range(3):
        s = t[(t.layer == layer) & t.variant.str.startswith("swiglu")].sort_values("params")
        assert s.init_val_nmse.is_monotonic_decreasing


@pytest.mark.slow  # builds or trains a library
def test_no_op_nmse_is_the_parents_relative_output_energy(built, tiny_text_parent):
    from puzzle.data import load_sequences
    from puzzle.loading import load_model, load_tokenizer

    cfg = tiny_config()
    parent = load_model(str(tiny_text_parent))
    ids = load_sequences(["stdlib"], load_tokenizer(str(tiny_text_parent)), seq_len=64, num_sequences=4,
                         split="validation")
    with torch.no_grad():
        x = parent.model.embed_tokens(ids)
        cos, sin = parent.model.rotary_emb(torch.arange(64)[None].expand(4, 64), x.dtype)
        ctx = {"cos": cos, "sin": sin, "mask": None, "cache": None}
        want = {}
        for l, block in enumerate(parent.model.layers):
            h = x + block.self_attn(block.input_layernorm(x), ctx)
            y = h + block.mlp(block.post_attention_layernorm(h))
            want[(l, "attention")] = float((h - x).pow(2).sum() / h.pow(2).sum())
            want[(l, "ffn")] = float((y - h).pow(2).sum() / y.pow(2).sum())
            x = y
    t = open_library(built).table
    assert cfg.bld.val_sequences == 4
    for (l, sub), energy in want.items():
        got = t[(t.layer == l) & (t.subblock == sub) & (t.variant == "no_op")].init_val_nmse.item()
        assert got == pytest.approx(energy, rel=1e-5)


@pytest.mark.slow  # builds or trains a library
def test_training_lowers_every_validation_nmse(trained):
    lib = open_library(trained)
    t = lib.table
    tr = t[t.trained.astype(bool)]
    assert lib.status == "trained" and len(tr) == 3 * (2 + 6)
    assert (tr.final_val_nmse < tr.init_val_nmse).all(), tr[tr.final_val_nmse >= tr.init_val_nmse]
    losses = pd.read_csv(trained / "bld" / "losses.csv")
    steps = lib.manifest["bld"]["steps"]
    assert steps == 1024 // 64 // 2 and set(losses.step) == set(range(1, steps + 1))
    assert len(losses) == steps * len(tr) and losses.train_nmse.notna().all() and (losses.train_nmse > 0).all()
    val = pd.read_csv(trained / "bld" / "validation.csv")
    assert sorted(set(val.step)) == [0, steps] and len(val) == 2 * len(tr)
    last = val[val.step == steps].set_index(["layer", "subblock", "variant"]).val_nmse
    assert last.to_dict() == tr.set_index(["layer", "subblock", "variant"]).final_val_nmse.to_dict()
    assert not (trained / "bld" / "ckpt").exists()  # cleaned up once done


@pytest.mark.slow  # builds or trains a library
def test_resume_after_a_kill_reproduces_an_uninterrupted_run(built, trained, tmp_path):
    """Kill -9 a training process after step 3 (checkpoint at step 2), rerun, compare bit for bit."""
    lib = tmp_path / "lib"
    shutil.copytree(built, lib)
    script = textwrap.dedent(f"""
        import os, signal, torch
        torch.set_num_threads({torch.get_num_threads()})
        from block_library import train_library
        def kill(step):
            if step == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        train_library({str(lib)!r}, progress=False, on_step=kill)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]
    assert (lib / "bld" / "ckpt" / "latest.json").is_file()
    assert open_library(lib).status == "initialized"
    train_library(lib, progress=False)
    manifest = open_library(lib).manifest
    assert manifest["bld"]["resumed_at_step"] == 2
    for f in sorted((trained / "trained").iterdir()):
        a, b = load_file(f), load_file(lib / "trained" / f.name)
        for k in a:
            assert torch.equal(a[k], b[k]), (f.name, k)
    pd.testing.assert_frame_equal(pd.read_csv(trained / "bld" / "losses.csv"), pd.read_csv(lib / "bld" / "losses.csv"))
    pd.testing.assert_frame_equal(open_library(trained).table, open_library(lib).table)


@pytest.mark.slow  # builds or trains a library
def test_two_processes_build_the_same_library_as_one(tiny_text_parent, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(tiny_config(tokens=512, ffn_refit=True).to_dict()))  # every statistic, refit's too
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"lib{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               "-m", "puzzle.cli.main", "library", "build", str(tiny_text_parent), "--out", str(outs[n]),
               "--config", str(cfg), "--train", "--no-progress"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert open_library(outs[2]).manifest["build"]["world_size"] == 2
    a, b = open_library(outs[1]).table, open_library(outs[2]).table
    pd.testing.assert_frame_equal(a, b)
    for f in sorted((outs[1] / "trained").iterdir()):
        x, y = load_file(f), load_file(outs[2] / "trained" / f.name)
        for k in x:
            torch.testing.assert_close(x[k], y[k], atol=1e-6, rtol=0)


@pytest.mark.slow  # builds or trains a library
def test_assemble_parent_architecture_gives_the_parents_logits(trained, tiny_text_parent):
    from puzzle.loading import load_model

    lib = open_library(trained)
    parent = load_model(str(tiny_text_parent))
    ids = torch.randint(0, 49152, (2, 20))
    with torch.no_grad():
        assert torch.equal(lib.assemble(parent.config.blocks)(ids).logits, parent(ids).logits)
        blocks = [BlockConfig(attention=AttentionConfig.gqa(1), ffn=FFNConfig.swiglu(48)),
                  BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.linear()),
                  BlockConfig(attention=AttentionConfig.linear(), ffn=FFNConfig.no_op())]
        child = lib.assemble(blocks)
        assert child.config.blocks == blocks
        trained_w = load_file(trained / "trained" / "L000.ffn.swiglu-48.safetensors")["mlp.down_proj.weight"]
        assert torch.equal(child.model.layers[0].mlp.down_proj.weight, trained_w)
        assert torch.isfinite(child(ids).logits).all()
    with pytest.raises(SchemaError, match=r"layer 0: the library has no ffn variant 'swiglu:50'"):
        lib.assemble([BlockConfig(attention=AttentionConfig.gqa(2), ffn=FFNConfig.swiglu(50))] * 3)


@pytest.mark.slow  # builds or trains a library
def test_bad_input_is_a_clear_error(built, tiny_text_parent, tmp_path):
    with pytest.raises(ConfigError, match="already holds a block library"):
        build_library(str(tiny_text_parent), built, tiny_config(), progress=False)
    with pytest.raises(ConfigError, match="inside the parent's directory"):
        build_library(str(tiny_text_parent), tiny_text_parent / "lib", tiny_config(), progress=False)
    with pytest.raises(ModelFilesError, match="not a block library"):
        train_library(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        build_library(str(tiny_text_parent), tmp_path / "afile", tiny_config(), progress=False)
    # A build that fails midway (no data) leaves no directory, not even its temporary one.
    from puzzle.errors import DataError

    empty = tmp_path / "empty_corpus"
    empty.mkdir()
    (empty / "a.txt").write_text("too short")
    cfg = LibraryConfig.from_dict({**tiny_config().to_dict(), "data": {"sources": [str(empty)], "seq_len": 64}})
    with pytest.raises(DataError):
        build_library(str(tiny_text_parent), tmp_path / "never", cfg, progress=False)
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))
    broken = tmp_path / "broken"
    shutil.copytree(built, broken)
    (broken / "init" / "L001.ffn.swiglu-64.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CorruptArtifactError, match="L001.ffn.swiglu-64.safetensors"):
        train_library(broken, progress=False)
    # A NaN loss stops training with the variant named (weights poisoned on purpose).
    nan = tmp_path / "nan"
    shutil.copytree(built, nan)
    f = nan / "init" / "L001.attention.gqa-1.safetensors"
    state = load_file(f)
    state["self_attn.q_proj.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(state, str(f))
    with pytest.raises(NumericalError, match=r"step 1: training NMSE of L001.attention.gqa:1 is nan"):
        train_library(nan, progress=False)
    # The parent changed on disk after the build: refused, not silently mixed.
    moved = tmp_path / "parent"
    shutil.copytree(tiny_text_parent, moved)
    lib = build_library(str(moved), tmp_path / "lib_of_moved", tiny_config(), progress=False)
    (moved / "config.json").write_text((moved / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    with pytest.raises(CorruptArtifactError, match="is not the one"):
        train_library(lib, progress=False)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 100, 1e-3, 0.1, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


@pytest.mark.slow  # builds or trains a library
def test_cli_build_train_show_inspect(tiny_text_parent, tmp_path, capsys):
    import yaml

    from puzzle.cli.main import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config().to_dict()))
    out = tmp_path / "lib"
    assert main(["library", "build", str(tiny_text_parent), "--out", str(out), "--config", str(cfg),
                 "--no-progress"]) == 0
    assert "36 variants over 3 layers [initialized]" in capsys.readouterr().out
    assert main(["library", "train", str(out), "--tokens", "256", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "[trained]" in text and "trained variants improved their validation NMSE" in text
    assert open_library(out).manifest["bld"]["steps"] == 2  # 256 tokens / (2 x 64)
    assert main(["library", "show", str(out), "--layer", "1"]) == 0
    shown = capsys.readouterr().out
    rows = shown.strip().splitlines()[2:]
    assert "final_val_nmse" in shown and len(rows) == 12 and all(r.split()[0] == "1" for r in rows)
    assert main(["inspect", str(out)]) == 0
    assert "no_op" in capsys.readouterr().out
    assert main(["library", "train", str(tmp_path)]) == 2
    assert "not a block library" in capsys.readouterr().err
    from puzzle.loading import load_model
    from puzzle.schema import save_blocks

    blocks = [BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(32))] * 3
    save_blocks(blocks, tmp_path / "arch.yaml")
    assert main(["library", "assemble", str(out), "--arch", str(tmp_path / "arch.yaml"), "--out", str(tmp_path / "child")]) == 0
    child = load_model(tmp_path / "child")
    assert child.config.blocks == blocks
    want = load_file(out / "trained" / "L002.ffn.swiglu-32.safetensors")["mlp.up_proj.weight"]
    assert torch.equal(child.model.layers[2].mlp.up_proj.weight, want)


@pytest.mark.slow  # trains a library
def test_the_seed_changes_the_training_order_only(built, trained, tmp_path):
    assert "seed" not in tiny_config().to_dict()["bld"]  # seed 0, the split's order: older libraries keep their hash
    assert tiny_config(seed=1).sha256() != tiny_config().sha256()
    with pytest.raises(ConfigError, match="seed"):
        tiny_config(seed=-1)
    out = tmp_path / "seeded"
    shutil.copytree(built, out)
    train_library(out, config=tiny_config(seed=1), progress=False)
    a, b = open_library(trained).table, open_library(out).table
    tr = b[b.trained.astype(bool)]
    assert len(tr) == 3 * (2 + 6) and (tr.final_val_nmse < tr.init_val_nmse).all()  # it learns as seed 0 does
    assert (a.init_val_nmse.values == b.init_val_nmse.values).all()  # the same initialization
    names = sorted(f.name for f in (trained / "trained").glob("*.safetensors"))
    assert names == sorted(f.name for f in (out / "trained").glob("*.safetensors"))
    same = [torch.equal(x, load_file(out / "trained" / n)[k]) for n in names for k, x in load_file(trained / "trained" / n).items()]
    assert not any(same)  # the same sequences in another order: other weights, every tensor


@pytest.mark.slow  # builds a library
def test_ffn_refit_changes_only_the_pruned_down_projections(built, tiny_text_parent, tmp_path):
    """The wiring of bld.ffn_refit through the build (the refit's math: test_init.py; its gain on real text:
    test_smollm2_bld.py; a random parent has little correlation between channels to exploit)."""
    refit = tiny_config(ffn_refit=True)
    assert refit.sha256() != tiny_config().sha256() and "ffn_refit" not in tiny_config().to_dict()["bld"]
    out = build_library(str(tiny_text_parent), tmp_path / "refit", refit, progress=False)
    a, b = open_library(built).table, open_library(out).table
    pruned = a.kind.eq("swiglu") & ~a.is_parent
    assert pruned.sum() == 3 * 5
    pd.testing.assert_series_equal(a[~pruned].init_val_nmse, b[~pruned].init_val_nmse)
    for f in a[pruned].file:
        x, y = load_file(built / f), load_file(out / f)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) != k.endswith("down_proj.weight"), k
