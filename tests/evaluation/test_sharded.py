"""The layer-sharded evaluation: the metrics of evaluate_quality, from directories, alone or over two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from block_library.distributed import split_layers
from puzzle.data.packing import load_sequences
from puzzle.errors import ConfigError, DataError
from puzzle.evaluation import evaluate_quality
from block_library.memory import PROCESS_BYTES
from puzzle.evaluation.memory import evaluate_rank_bytes, layer_params
from puzzle.evaluation.sharded import evaluate_sharded
from puzzle.loading import load_config, load_model, load_tokenizer
from puzzle.model import PuzzleConfig
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig
from tests.evaluation.sharded_worker import write_random_model

PROCESS_SPREAD = 0.15 * 2**30
"""How far a process's own memory (Python, torch, the test's imports) strays from the plan's
``PROCESS_BYTES`` (0.33-0.48 GiB measured across torchrun ranks and test workers)."""


ROOT = Path(__file__).resolve().parents[2]
DATA = dict(sources=["stdlib"], seq_len=24, num_sequences=3)  # 3 rows, chunk 2: an uneven last chunk


def _close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k


@pytest.fixture(scope="module")
def pair(tiny_text_parent, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny 3-layer parent (HF dir) and a random runtime child of another shape (no-op attention,
    narrower and linear FFNs)."""
    parent = load_model(tiny_text_parent)
    blocks = [BlockConfig(attention=AttentionConfig.gqa(1), ffn=FFNConfig.swiglu(48)),
              BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(96)),
              BlockConfig(attention=AttentionConfig.gqa(2), ffn=FFNConfig.linear())]
    child_dir = write_random_model(tmp_path_factory.mktemp("child") / "child", parent.config.with_blocks(blocks),
                                   seed=1, std=0.1, tokenizer_dir=tiny_text_parent)
    return Path(tiny_text_parent), child_dir


@pytest.fixture(scope="module")
def short_child(pair, tmp_path_factory) -> Path:
    """A 2-layer child of the 3-layer parent: the two are split over ranks separately."""
    config = load_config(pair[0])
    blocks = [BlockConfig(attention=AttentionConfig.gqa(2), ffn=FFNConfig.swiglu(64))] * 2
    return write_random_model(tmp_path_factory.mktemp("short") / "child", config.with_blocks(blocks), seed=2, std=0.1)


@pytest.fixture(scope="module")
def reference(pair, short_child):
    parent_dir, child_dir = pair
    tok = load_tokenizer(parent_dir)
    ids = load_sequences(DATA["sources"], tok, seq_len=DATA["seq_len"], num_sequences=DATA["num_sequences"],
                         split="validation")
    parent, child = load_model(parent_dir), load_model(child_dir)
    return {"pair": evaluate_quality(child, ids, parent=parent, chunk=2),
            "alone": evaluate_quality(child, ids, chunk=2), "self": evaluate_quality(child, ids, parent=child, chunk=2),
            "other": evaluate_quality(load_model(short_child), ids, parent=parent, chunk=2)}


def test_one_process_equals_evaluate_quality(pair, reference):
    parent_dir, child_dir = pair
    tok = load_tokenizer(parent_dir)
    got = evaluate_sharded(child_dir, parent_dir, tok, chunk=2, logit_positions=7, **DATA)  # blocks across rows
    assert got["kl"] > 1e-3 and got["top1_agreement"] < 1
    _close(got, reference["pair"])


def test_one_process_alone_and_against_itself(pair, reference):
    parent_dir, child_dir = pair
    tok = load_tokenizer(parent_dir)
    _close(evaluate_sharded(child_dir, None, tok, chunk=2, **DATA), reference["alone"])
    same = evaluate_sharded(child_dir, child_dir, tok, chunk=3, **DATA)
    assert same["kl"] == 0.0 and same["top1_agreement"] == 1.0 and same["loss_delta"] == 0.0
    _close(same, reference["self"])


def test_bad_inputs(pair, tiny_parent_factory):
    parent_dir, child_dir = pair
    tok = load_tokenizer(parent_dir)
    other = tiny_parent_factory("llama")  # vocab 128
    with pytest.raises(ConfigError, match="vocabularies differ"):
        evaluate_sharded(child_dir, other, tok, **DATA)
    with pytest.raises(DataError, match="seq_len must be >= 2"):
        evaluate_sharded(child_dir, parent_dir, tok, sources=["stdlib"], seq_len=1, num_sequences=2)


def _torchrun(child: Path, parent: Path, out: Path, *args: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.evaluation.sharded_worker", str(child), str(parent), str(out), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow  # two processes
def test_two_processes_equal_evaluate_quality(pair, short_child, reference, tmp_path):
    parent_dir, child_dir = pair
    ranks = _torchrun(child_dir, parent_dir, tmp_path, "--seq-len", "24", "--num-sequences", "3", "--chunk", "2",
                      "--logit-positions", "50", "--alone", "--other-child", str(short_child))
    for key, ref in (("result", reference["pair"]), ("result_alone", reference["alone"]),
                     ("result_other", reference["other"])):
        assert ranks[0][key] == ranks[1][key]  # broadcast: the same dict on every rank
        _close(ranks[0][key], ref)


@pytest.mark.slow  # writes two models of ~1 GB together and evaluates them over two processes
def test_peak_memory_per_rank_follows_the_formula(tiny_text_parent, tmp_path):
    """Ranks read about 0.5 GB of weights each per phase; what the evaluation adds to their RSS is
    within 30% of the formula's count, and the whole peak within the formula's plan."""
    big = PuzzleConfig(vocab_size=load_config(tiny_text_parent).vocab_size, hidden_size=1024, num_attention_heads=16,
                       num_key_value_heads=4, intermediate_size=4096, num_hidden_layers=12, tie_word_embeddings=False)
    wide, narrow = BlockConfig(attention=AttentionConfig.gqa(4), ffn=FFNConfig.swiglu(4096)), \
        BlockConfig(attention=AttentionConfig.gqa(2), ffn=FFNConfig.swiglu(1024))
    parent = write_random_model(tmp_path / "parent", big, seed=0, tokenizer_dir=tiny_text_parent)
    child_cfg = big.with_blocks([wide, narrow] * 6)
    child = write_random_model(tmp_path / "child", child_cfg, seed=1)
    seq_len, chunk, n = 128, 2, 4
    ranks = _torchrun(child, parent, tmp_path / "out", "--seq-len", str(seq_len), "--num-sequences", str(n),
                      "--chunk", str(chunk))
    pr, cr = split_layers(layer_params(big), 2), split_layers(layer_params(child_cfg), 2)  # as evaluate_sharded
    for r, got in enumerate(ranks):
        plan = evaluate_rank_bytes(big, child_cfg, pr[r], cr[r], first=r == 0, last=r == 1, chunk=chunk,
                                   seq_len=seq_len, num_sequences=n, dtype_bytes=4)
        stage, added = plan - PROCESS_BYTES, got["peak_rss"] - got["rss_before"]
        print(f"rank {r}: parent layers {list(pr[r])}, child layers {list(cr[r])}: peak {got['peak_rss'] / 2**30:.3f} "
              f"GiB (process before {got['rss_before'] / 2**30:.3f}, added {added / 2**30:.3f}); plan "
              f"{plan / 2**30:.3f} GiB (stage {stage / 2**30:.3f})")
        assert abs(added - stage) <= 0.3 * stage
        assert got["peak_rss"] <= plan + PROCESS_SPREAD
    assert torch.isfinite(torch.tensor(ranks[0]["result"]["kl"]))
