"""``puzzle fuse`` end to end: a tiny parent, the real SmolLM2 parent, and a trained SmolLM2 library."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from puzzle.cli.main import main
from puzzle.fusion import Segment, fuse_model
from puzzle.fusion.derive import derive_model, without_attention
from puzzle.fusion.fuse import parallel_reference
from puzzle.loading import load_model
from puzzle.profiler.hardware import DEFAULT_TARGET
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig, save_blocks

FAST = ["--sequences", "2", "--seq-len", "32", "--no-measure", "--no-progress",
        "--engine", "transformers"]  # the tiny parent's widths are not multiples of 256


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.slow  # about 10 s
def test_fuse_by_hand_on_a_tiny_parent(tiny_text_parent, tmp_path, capsys):
    out = tmp_path / "fused"
    assert main(["fuse", str(tiny_text_parent), "--no-attention", "1-2", "--segments", "1-2", "--out", str(out),
                 *FAST]) == 0
    printed = capsys.readouterr().out
    assert "attention-free SwiGLU runs: 1-2" in printed and "3 -> 2 layers" in printed
    fused = load_model(out / "model")
    assert [b.label for b in fused.config.blocks][1] == "no_op|swiglu:192"  # 96 + 96
    parent = load_model(tiny_text_parent)
    expect = fuse_model(derive_model(parent, without_attention(parent.config.blocks, [1, 2])), [Segment(1, 3)])
    ids = torch.randint(0, parent.config.vocab_size, (2, 12))
    torch.testing.assert_close(_logits(fused, ids), _logits(expect, ids), rtol=0, atol=0)
    report = pd.read_csv(out / "report.csv")
    assert list(report.segment) == ["unfused", "1-2", "all"]
    all_row = report.set_index("segment").loc["all"]
    # The unfused child's KL to the parent is the "before"; fusing can only be measured against it.
    assert all_row.kl > 0 and all_row.kl_to_parent > 0
    latency = pd.read_csv(out / "latency.csv")
    assert set(latency.scenario) == {"prefill", "decode"} and (latency.fused_ms < latency.unfused_ms).all()
    assert set(latency.target) == {f"{DEFAULT_TARGET}:bf16"}  # no --target: the one default target
    assert json.loads((out / "manifest.json").read_text())["segments"] == ["1-2"]
    assert (out / "dependency.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--segments", "0-1"], "not attention-free SwiGLU"),
    (["--no-attention", "7"], "do not exist"),
    (["--segments", "2-1"], "ends before it starts"),
])
def test_bad_fusion_requests_exit_2_with_one_line(tiny_text_parent, tmp_path, capsys, argv, message):
    assert main(["fuse", str(tiny_text_parent), "--out", str(tmp_path / "o"), *argv, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_refuses_a_non_empty_out(tiny_text_parent, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    assert main(["fuse", str(tiny_text_parent), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert (tmp_path / "o" / "keep.txt").read_text() == "x"


def test_fuse_smollm2_with_attention_removed_by_hand(smollm2, smollm2_source, tmp_path):
    """The real parent: fusion of 4 real layers is the exact parallel sum, and the export reloads exactly."""
    child = derive_model(smollm2, without_attention(smollm2.config.blocks, range(20, 24)))
    seg = Segment(20, 24)
    fused = fuse_model(child, [seg])
    assert fused.config.num_hidden_layers == 27 and fused.config.blocks[20].ffn.intermediate_size == 4 * 1536
    with torch.no_grad():
        x = torch.randn(2, 16, 576) * 3
        got = fused.model.layers[20](x, {"cos": None, "sin": None, "mask": None, "cache": None})
        want = parallel_reference(child, seg, x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    out = tmp_path / "fz"
    assert main(["fuse", str(smollm2_source.directory), "--no-attention", "20-23", "--threshold", "2", "--max-segment-kl", "-1",
                 "--out", str(out), *FAST]) == 0
    deps = json.loads((out / "dependency.json").read_text())["runs"]
    assert [(d["start"], d["stop"]) for d in deps] == [(20, 24)]
    m = torch.tensor(deps[0]["matrix"])
    upper = torch.triu_indices(4, 4, offset=1)
    assert m.shape == (4, 4) and (m[upper[0], upper[1]] > 0).all() and (m.tril() == 0).all()
    reloaded = load_model(out / "model")
    assert reloaded.config.blocks == fused.config.blocks
    ids = torch.randint(0, 49152, (1, 24))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(fused, ids), rtol=0, atol=0)
    report = pd.read_csv(out / "report.csv").set_index("segment")
    assert report.loc["all", "kl_to_parent"] > report.loc["unfused", "kl_to_parent"] > 0


def test_fuse_a_library_architecture(smollm2_trained_library, tmp_path):
    """--arch over a trained library: BLD variants (a narrower FFN in the run) are fused too."""
    lib = smollm2_trained_library
    blocks = lib.parent_config.blocks
    for i in (24, 25, 26):
        blocks[i] = BlockConfig(attention=AttentionConfig.no_op(), ffn=blocks[i].ffn)
    blocks[25] = BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(1024))
    save_blocks(blocks, tmp_path / "arch.json")
    out = tmp_path / "fz"
    assert main(["fuse", str(lib.directory), "--arch", str(tmp_path / "arch.json"), "--segments", "24-26",
                 "--out", str(out), *FAST]) == 0
    fused = load_model(out / "model")
    assert fused.config.num_hidden_layers == 28 and fused.config.blocks[24].ffn.intermediate_size == 1536 + 1024 + 1536
    child = lib.assemble(blocks)
    ids = torch.randint(0, 49152, (1, 24))
    want = _logits(fuse_model(child, [Segment(24, 27)]), ids)
    torch.testing.assert_close(_logits(fused, ids), want, rtol=0, atol=0)
