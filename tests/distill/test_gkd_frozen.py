"""GKD that trains part of the child (``GKDConfig.train``): frozen weights come back bit for bit, the trained ones
move and the loss falls; 2 processes train the replaced sub-blocks as one does; validation against the parent's
cached targets with k = V is the live validation.

The 2-process runs start this file as their worker, with ``torchrun``::

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.distill.test_gkd_frozen DIR
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from puzzle.distill import distill_child
from puzzle.distill.artifact import model_fingerprint
from puzzle.distill.gkd import gkd_val_ids
from puzzle.distill.memory import gathered_bytes, gkd_rank_bytes, loss_units_bytes
from puzzle.distill.teacher_cache import compute_targets, targets_key
from puzzle.distill.trainable import param_split, trained_names
from puzzle.errors import ConfigError
from puzzle.loading import load_model, save_runtime
from tests.distill.test_child_bld import carved
from tests.distill.tiny import VOCAB, CharTokenizer, child_of, small, snapshot, tiny_parent

ROOT = Path(__file__).resolve().parents[2]
CFG = dict(steps=4, lr=1e-2, val_every=2)
REPLACED = ("model.layers.0.post_attention_layernorm.", "model.layers.0.mlp.", "model.layers.2.input_layernorm.",
            "model.layers.2.self_attn.")
"""The carved child's replaced sub-blocks (layer 0's halved FFN, layer 2's one-KV-head attention), norms included."""
TRAIN = ["train_loss", "train_kl", "train_cos", "train_lm"]
VAL = ["val_kl", "val_top1", "val_lm", "val_cos"]


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def _val_targets(parent, cfg, tok, k: int = VOCAB):
    """The parent's targets on GKD's validation sequences, keyed as a one-process run checks them."""
    ids = gkd_val_ids(cfg, tok)
    return compute_targets(parent, ids, k, key=targets_key(model_fingerprint(parent), ids, k),
                           hidden_dtype=torch.float32, labels=True)


@pytest.mark.parametrize("train, frozen", [("replaced", None), ("decoder", ("model.embed_tokens.", "lm_head."))])
def test_frozen_weights_come_back_bit_for_bit_and_the_trained_ones_move(train, frozen, tok, tmp_path):
    parent = tiny_parent()
    child = carved(parent)
    before = snapshot(child)
    result = distill_child(child, parent, tok, tmp_path / train, small(**CFG, train=train), progress=False)
    moved = _moved(before, result.model.state_dict())
    if train == "replaced":
        assert moved == {k for k in before if k.startswith(REPLACED)}  # 9 tensors, every one of them moves
    else:
        assert moved == {k for k in before if not k.startswith(frozen)}
    split = param_split(child.config, parent.config, train)
    assert result.manifest["params"] == {"trained": split.trained, "frozen": split.frozen}
    assert split.trained == sum(before[k].numel() for k in moved)
    assert result.manifest["inputs"]["config"]["train"] == train  # part of the run's identity
    # the validation KL on the same held-out sequences: 0.350 -> 0.247 (replaced), -> 0.194 (decoder)
    assert result.initial["kl"] == pytest.approx(0.350, abs=1e-3)
    assert result.final["kl"] < 0.8 * result.initial["kl"]
    assert not _moved(before, snapshot(child))  # the child given is never modified


def test_every_weight_trains_by_default_and_keeps_its_identity(parent, child, tok, tmp_path):
    result = distill_child(child, parent, tok, tmp_path / "all", small(steps=2), progress=False)
    assert "train" not in result.manifest["inputs"]["config"]  # runs from before the field keep their inputs
    assert result.manifest["params"]["frozen"] == 0
    assert len(trained_names(child, parent.config, "all")) == len(list(child.parameters()))


def test_nothing_to_train_is_refused(parent, child, tok, tmp_path):
    # child_of only removes an attention: no sub-block differs from the parent's and is not a no-op
    with pytest.raises(ConfigError, match="train='replaced' has nothing to train"):
        distill_child(child, parent, tok, tmp_path / "none", small(train="replaced"), progress=False)
    with pytest.raises(ConfigError, match="train must be one of"):
        small(train="norms")
    fused = parent.config.with_blocks(list(parent.config.blocks)[:2])  # two layers fused into one: no map to them
    with pytest.raises(ConfigError, match="the child has 2, the parent 3 \\(a fused child\\)"):
        param_split(fused, parent.config, "replaced")
    assert param_split(fused, parent.config, "decoder").frozen == 2 * VOCAB * 32  # the embedding and the head


def test_a_frozen_run_resumes_bit_for_bit(tok, tmp_path):
    parent = tiny_parent()
    child, cfg = carved(parent), small(steps=6, lr=1e-2, checkpoint_every=2, train="replaced")
    whole = distill_child(child, parent, tok, tmp_path / "a", cfg, progress=False)

    def interrupt(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_child(child, parent, tok, tmp_path / "b", cfg, progress=False, on_step=interrupt)
    resumed = distill_child(child, parent, tok, tmp_path / "b", cfg, progress=False)
    assert resumed.manifest["resumed_at_step"] == 2
    assert not _moved(whole.model.state_dict(), resumed.model.state_dict())
    assert resumed.curve.equals(whole.curve)


def test_cached_validation_with_k_equal_v_is_the_live_validation(tok, tmp_path, caplog):
    parent = tiny_parent()
    child, cfg = carved(parent), small(**CFG, train="replaced")
    live = distill_child(child, parent, tok, tmp_path / "live", cfg, progress=False)
    with caplog.at_level(logging.INFO, logger="puzzle.distill.gkd"):
        cached = distill_child(child, parent, tok, tmp_path / "cached", cfg, progress=False,
                               val_teacher=_val_targets(parent, cfg, tok))
    assert cached.manifest["inputs"]["val_teacher_top_k"] == VOCAB
    pd.testing.assert_frame_equal(cached.curve[TRAIN], live.curve[TRAIN], rtol=0, atol=0)  # training: the same run
    # measured: <= 1.1e-7 relative (the KL summed over the parent's sorted top k instead of the vocabulary)
    pd.testing.assert_frame_equal(cached.curve[VAL], live.curve[VAL], rtol=1e-5, atol=0)
    assert cached.manifest["parent_val_lm"] == pytest.approx(live.manifest["parent_val_lm"], rel=1e-6)
    assert live.initial["kl"] > 0.05  # a real divergence to compare, not rounding
    # targets of other sequences are refused
    other = _val_targets(parent, small(**CFG, seq_len=16), tok)
    with pytest.raises(ConfigError, match="cached validation targets are of other tokens"):
        distill_child(child, parent, tok, tmp_path / "other", cfg, progress=False, val_teacher=other)


def test_the_memory_formula_counts_frozen_weights_and_a_cached_teacher():
    kw = dict(largest_unit_params=1000, world=2, micro_batch=2, seq_len=8, hidden=16, layers=4, vocab=100)
    whole = gkd_rank_bytes(10_000, 20_000, **kw)
    assert whole - gkd_rank_bytes(10_000, 20_000, frozen_params=6_000, **kw) == 12 * 6_000 / 2  # 16 -> 4 B a rank
    # no parent shard, no parent hidden states (5 of 16 fp32), the logits' 32 B -> 24 B; the cached last state
    per_token = 4 * 16 * 5 + 32 * 100 - (4 * 16 + 24 * 100)
    assert whole - gkd_rank_bytes(10_000, 20_000, teacher=False, **kw) == 4 * 20_000 / 2 + 2 * 8 * per_token
    # the units held whole: a layer 16 B a trained and 8 B a frozen parameter; a frozen tied embedding (1000) stays
    # gathered beside it, an untied one is a unit of its own (8 B); a trained one as every weight trained (16 B)
    layers = [(10, 90), (0, 100)]
    assert gathered_bytes(layers, (0, 1000), vocab_hidden=1000, tied=True) == 4 * 1000 + 16 * 10 + 8 * 90
    assert gathered_bytes(layers, (0, 2000), vocab_hidden=1000, tied=False) == 8 * 1000
    assert gathered_bytes(layers, (1016, 0), vocab_hidden=1000, tied=True) == 16 * 1000


def test_the_largest_unit_and_the_logits_are_not_counted_together():
    kw = dict(world=2, micro_batch=2, seq_len=8, hidden=16, layers=4, vocab=100, unit_bytes=16_000.0, teacher=False)
    summed = gkd_rank_bytes(10_000, 20_000, **kw)  # no phase given: the unit beside the logits, an upper bound
    tokens_targets = 2 * 8 * (4 * 16 + 24 * 100)  # the cached last state and the logits' buffers
    # beside the logits only the head's weights (4 B x V x H = 6,400 here): the unit (16,000) is freed by then
    assert summed - gkd_rank_bytes(10_000, 20_000, loss_unit_bytes=6_400.0, **kw) == 16_000 - 6_400
    # a unit larger than the logits' phase is the peak on its own
    big = dict(kw, unit_bytes=100_000.0)
    assert gkd_rank_bytes(10_000, 20_000, loss_unit_bytes=6_400.0, **big) == \
        gkd_rank_bytes(10_000, 20_000, **big) - tokens_targets
    # what is held beside the logits: a frozen tied embedding's root unit stays gathered through the step; else the
    # head's fp32 weights and the largest layer's (the last one, prefetched for its backward)
    layers = [(10, 90), (0, 100), (120, 0)]
    assert loss_units_bytes(layers, (0, 1000), vocab_hidden=1000, tied=True, units=5_000.0) == 5_000
    assert loss_units_bytes(layers, (1016, 0), vocab_hidden=1000, tied=True, units=16_000.0) == 4 * (1000 + 120)
    assert loss_units_bytes(layers, (0, 2000), vocab_hidden=1000, tied=False, units=8_000.0) == 4 * (1000 + 120)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The tiny parent and its carved child stored, then one 2-process start (see :func:`_worker`): the replaced
    sub-blocks distilled from the live sharded parent, and from cached targets of k = V with no parent loaded."""
    d = tmp_path_factory.mktemp("frozen_two")
    parent = tiny_parent()
    save_runtime(parent, d / "parent")
    save_runtime(carved(parent), d / "child")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.distill.test_gkd_frozen", str(d)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (d / "stderr.txt").write_text(r.stderr)
    return d


@pytest.mark.slow  # starts 2 processes (~30 s on 2 busy cores)
def test_two_processes_train_the_replaced_subblocks_as_one(two):
    torch.set_num_threads(1)
    parent, child, tok = load_model(two / "parent"), load_model(two / "child"), CharTokenizer()
    one = distill_child(child, parent, tok, two / "one", small(**CFG, train="replaced"), progress=False)
    want = one.model.state_dict()
    for run in ("live", "cached"):
        got = load_model(two / run / "child").state_dict()
        assert _moved(dict(child.state_dict()), got) == {k for k in got if k.startswith(REPLACED)}, run
        for k, v in want.items():  # measured: <= 2.4e-7 of each tensor's largest value
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5 * float(v.abs().max()), msg=f"{run} {k}")
        curve = pd.read_csv(two / run / "curve.csv")  # measured: <= 1.1e-7 relative
        pd.testing.assert_frame_equal(curve[TRAIN + VAL], one.curve[TRAIN + VAL], rtol=1e-5, atol=0)
        manifest = json.loads((two / run / "manifest.json").read_text())
        assert manifest["processes"] == 2 and manifest["params"] == one.manifest["params"]
    stderr = (two / "stderr.txt").read_text()
    assert "GKD over 2 processes: the student sharded (FSDP2)" in stderr  # the cached run loads no parent
    assert "the parent runs nowhere" in stderr


# ---------------------------------------------------------------------------------- the torchrun worker


def _worker(d: Path) -> None:
    from block_library.distributed import init_shard
    from puzzle.distill.artifact import files_fingerprint
    from puzzle.distill.gkd import gkd_train_ids
    from puzzle.distill.teacher_sharded import sharded_targets
    from puzzle.loading import load_layers

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    shard = init_shard([1.0, 1.0])
    tok, cfg = CharTokenizer(), small(**CFG, train="replaced")
    parent, child = load_layers(d / "parent", []), load_layers(d / "child", [])  # on meta, as the stage has them
    distill_child(child, parent, tok, d / "live", cfg, progress=False)
    sha, exact = files_fingerprint(parent), dict(shard=shard, hidden_dtype=torch.float32)
    teacher = sharded_targets(d / "parent", gkd_train_ids(cfg, tok), VOCAB, d / "teacher" / "train.safetensors",
                              parent_sha256=sha, **exact)
    val = sharded_targets(d / "parent", gkd_val_ids(cfg, tok), VOCAB, d / "teacher" / "val.safetensors",
                          parent_sha256=sha, labels=True, **exact)
    distill_child(child, parent, tok, d / "cached", cfg, progress=False, teacher=teacher, val_teacher=val)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
