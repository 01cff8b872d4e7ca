"""Child-aware BLD: only the child's replaced sub-blocks train, on the child's own stream, and the child gets closer."""

from __future__ import annotations

import pytest
import torch

from puzzle.distill.child_bld import ChildBLDConfig, replaced_subblocks, train_child_blocks
from puzzle.errors import ConfigError
from puzzle.evaluation.quality import evaluate_quality
from puzzle.model.weights import model_from_state_dict
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig
from tests.distill.tiny import VOCAB, assert_same, snapshot, tiny_parent

SMALL = dict(batch=4, seq_len=32, lr=1e-2, checkpoint_every=2)


def carved(parent, *, narrow_ffn=(0,), no_attention=(1,), one_kv_head=(2,)):  # noqa: ANN001, ANN201
    """``parent`` with some FFNs cut to half their channels, some attentions removed and some cut to one KV
    head: the kinds of sub-blocks a library holds, with weights sliced from the parent's (untrained)."""
    cfg, state = parent.config, {k: v.detach().clone() for k, v in parent.state_dict().items()}
    hd, blocks = cfg.head_dim, []
    for i, b in enumerate(cfg.blocks):
        attention, ffn, p = b.attention, b.ffn, f"model.layers.{i}."
        if i in narrow_ffn:
            half = b.ffn.intermediate_size // 2
            ffn = FFNConfig.swiglu(half)
            for name in ("gate_proj", "up_proj"):
                state[f"{p}mlp.{name}.weight"] = state[f"{p}mlp.{name}.weight"][:half].clone()
            state[f"{p}mlp.down_proj.weight"] = state[f"{p}mlp.down_proj.weight"][:, :half].clone()
        if i in no_attention:
            attention = AttentionConfig.no_op()
            state = {k: v for k, v in state.items() if not k.startswith((f"{p}self_attn.", f"{p}input_layernorm."))}
        elif i in one_kv_head:
            attention = AttentionConfig.gqa(1)
            for name in ("k_proj", "v_proj"):
                state[f"{p}self_attn.{name}.weight"] = state[f"{p}self_attn.{name}.weight"][:hd].clone()
        blocks.append(BlockConfig(attention=attention, ffn=ffn))
    state.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None
    return model_from_state_dict(cfg.with_blocks(blocks), state)


def _ids(n: int, seq_len: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def test_only_the_replaced_subblocks_train_and_their_loss_falls():
    torch.manual_seed(0)
    parent = tiny_parent()
    child = carved(parent)
    assert replaced_subblocks(child, parent) == [(0, "ffn"), (2, "attention")]  # the no-op has nothing to train
    before = snapshot(child)
    result = train_child_blocks(child, parent, _ids(6 * 4), ChildBLDConfig(tokens=6 * 4 * 32, **SMALL))
    assert result.trained == ["L000.ffn", "L002.attention"] and result.steps == 6 and result.tokens == 6 * 4 * 32
    after = child.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
                     "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                     "model.layers.2.input_layernorm.weight", "model.layers.2.self_attn.q_proj.weight",
                     "model.layers.2.self_attn.k_proj.weight", "model.layers.2.self_attn.v_proj.weight",
                     "model.layers.2.self_attn.o_proj.weight"}
    assert all(result.last_nmse[k] < result.first_nmse[k] for k in result.trained), (result.first_nmse,
                                                                                      result.last_nmse)
    assert not any(p.requires_grad for p in child.parameters()) and not child.training


def test_the_trained_child_is_closer_to_the_parent_on_held_out_tokens():
    parent = tiny_parent()
    child = carved(parent, no_attention=())  # a removed attention is not trainable: it would dominate the KL
    held_out = _ids(8, seed=99)
    kl_before = evaluate_quality(child, held_out, parent=parent)["kl"]
    train_child_blocks(child, parent, _ids(6 * 4), ChildBLDConfig(tokens=6 * 4 * 32, **SMALL))
    kl_after = evaluate_quality(child, held_out, parent=parent)["kl"]
    assert kl_after < 0.85 * kl_before, (kl_before, kl_after)  # measured 0.230 -> 0.182


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    parent, ids, cfg = tiny_parent(), _ids(6 * 4), ChildBLDConfig(tokens=6 * 4 * 32, **SMALL)
    whole = carved(parent)
    train_child_blocks(whole, parent, ids, cfg, directory=tmp_path / "a")

    class Stop(Exception):
        pass

    def stop_after_step_4(step: int) -> None:
        if step == 3:  # 4 steps done, the checkpoint of step 4 committed
            raise Stop

    interrupted = carved(parent)
    with pytest.raises(Stop):
        train_child_blocks(interrupted, parent, ids, cfg, directory=tmp_path / "b", on_step=stop_after_step_4)
    other = carved(parent)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(0.5)  # other starting weights: the checkpoint is not theirs
    assert train_child_blocks(other, parent, ids, cfg, directory=tmp_path / "c").tokens == 6 * 4 * 32
    with pytest.raises(Stop):
        train_child_blocks(carved(parent), parent, ids, cfg, directory=tmp_path / "c", on_step=stop_after_step_4)
    assert train_child_blocks(other, parent, ids, cfg, directory=tmp_path / "c").tokens == 6 * 4 * 32
    fresh = carved(parent)  # a new process: the weights come back from the checkpoint
    result = train_child_blocks(fresh, parent, ids, cfg, directory=tmp_path / "b")
    assert result.tokens == 2 * 4 * 32  # only steps 5 and 6 ran
    assert_same(fresh, snapshot(whole))
    assert (tmp_path / "b" / "losses.csv").read_text() == (tmp_path / "a" / "losses.csv").read_text()
    again = carved(parent)  # a finished run, rerun (its caller killed before saving the child): weights reloaded
    assert train_child_blocks(again, parent, ids, cfg, directory=tmp_path / "a").tokens == 0
    assert_same(again, snapshot(whole))


def test_a_child_equal_to_its_parent_trains_nothing():
    parent = tiny_parent()
    child = carved(parent, narrow_ffn=(), no_attention=(), one_kv_head=())
    before = snapshot(child)
    result = train_child_blocks(child, parent, _ids(4), ChildBLDConfig(tokens=4 * 32, **SMALL))
    assert result.trained == [] and result.tokens == 0
    assert_same(child, before)


def test_bad_input_is_a_config_error_before_any_training():
    parent = tiny_parent()
    with pytest.raises(ConfigError, match="tokens >= 1"):
        ChildBLDConfig(tokens=0)
    cfg = ChildBLDConfig(tokens=4 * 4 * 32, **SMALL)
    assert (cfg.steps, cfg.step_batch) == (4, 4) and ChildBLDConfig(tokens=64, **SMALL).step_batch == 2
    child = carved(parent)
    before = snapshot(child)
    with pytest.raises(ConfigError, match=r"needs \(16, 32\) token ids, got \(8, 32\)"):
        train_child_blocks(child, parent, _ids(8), cfg)
    with pytest.raises(ConfigError, match="before FFN fusion"):
        train_child_blocks(carved(tiny_parent(layers=2)), parent, _ids(16), cfg)
    assert_same(child, before)


@pytest.mark.slow  # the real parent and its trained library (shared fixtures); the training itself takes ~10 s
def test_on_smollm2_a_library_child_gets_closer_to_the_parent(smollm2, smollm2_tokenizer, smollm2_trained_library):
    from puzzle.data.packing import load_sequences

    lib = smollm2_trained_library
    blocks = [BlockConfig(attention=AttentionConfig.gqa(1) if i in (4, 10, 16) else b.attention,
                          ffn=FFNConfig.swiglu(768) if 8 <= i < 22 else b.ffn)
              for i, b in enumerate(lib.parent_config.blocks)]
    child = lib.assemble(blocks)
    assert len(replaced_subblocks(child, smollm2)) == 17
    tok = smollm2_tokenizer
    held_out = load_sequences(["stdlib"], tok, seq_len=128, num_sequences=2, split="validation")
    train = load_sequences(["stdlib"], tok, seq_len=128, num_sequences=24, split="train")[8:]  # after calibration
    kl_before = evaluate_quality(child, held_out, parent=smollm2)["kl"]
    result = train_child_blocks(child, smollm2, train, ChildBLDConfig(tokens=2048, batch=8, seq_len=128))
    kl_after = evaluate_quality(child, held_out, parent=smollm2)["kl"]
    summary = result.summary()  # two steps on different batches: the mean, not every sub-block, must fall
    assert result.steps == 2 and summary["last_nmse"] < summary["first_nmse"], summary
    assert kl_after < 0.95 * kl_before, (kl_before, kl_after)


def test_the_seed_orders_the_training_sequences(tiny_text_parent):
    from dataclasses import replace

    from puzzle.distill.child_bld import training_ids
    from puzzle.loading import load_tokenizer

    tok, cfg = load_tokenizer(str(tiny_text_parent)), ChildBLDConfig(tokens=8 * 32, **SMALL)
    a, b = training_ids(["stdlib"], tok, cfg, skip=3), training_ids(["stdlib"], tok, replace(cfg, seed=1), skip=3)
    assert a.shape == b.shape == (8, 32) and not torch.equal(a, b)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))  # the same sequences, in another order
    with pytest.raises(ConfigError, match="seed"):
        replace(cfg, seed=-1)
