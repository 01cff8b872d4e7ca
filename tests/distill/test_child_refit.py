"""The child-stream refit: each pruned FFN's down projection is the ridge least-squares fit on the child's own stream."""

from __future__ import annotations

import pytest
import torch

from puzzle.distill.child_bld import ChildBLDConfig, train_child_blocks
from puzzle.distill.child_refit import refit_child_ffns
from puzzle.errors import ConfigError
from puzzle.evaluation.quality import evaluate_quality
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig
from tests.distill.test_child_bld import SMALL, _ids, carved
from tests.distill.tiny import assert_same, snapshot, tiny_parent


def _captured(model, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """(the stream entering layer ``layer``'s FFN, the stream after the layer), (B*T, H) each, from the model's own
    forward pass."""
    got: dict[str, torch.Tensor] = {}
    block = model.model.layers[layer]
    hooks = [block.post_attention_layernorm.register_forward_pre_hook(lambda m, a: got.setdefault("h", a[0])),
             block.register_forward_hook(lambda m, a, out: got.setdefault("next", out))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    H = model.config.hidden_size
    return got["h"].reshape(-1, H).double(), got["next"].reshape(-1, H).double()


def _expected(child, parent, ids, layer, w0, drift, ridge=0.1):  # noqa: ANN001, ANN202
    """Ridge least squares towards ``w0`` on the stacked system, from the child's and the parent's own forwards."""
    h, _ = _captured(child, ids, layer)
    _, p_next = _captured(parent, ids, layer)
    mine, theirs = child.model.layers[layer], parent.model.layers[layer]
    with torch.no_grad():
        n = mine.post_attention_layernorm(h.float())
        a = (torch.nn.functional.silu(mine.mlp.gate_proj(n)) * mine.mlp.up_proj(n)).double()  # (N, k)
        t = theirs.mlp(theirs.post_attention_layernorm(h.float())).double()  # (N, H)
    t = t + drift * (p_next - h - t)
    lam = ridge * float(torch.diagonal(a.T @ a).mean())
    k = a.shape[1]
    stacked_a = torch.cat([a, lam ** 0.5 * torch.eye(k, dtype=torch.float64)])
    stacked_t = torch.cat([t, lam ** 0.5 * w0.double().T])
    return torch.linalg.lstsq(stacked_a, stacked_t).solution.T, a, t  # (H, k)


def _refit(drift: float, select: bool):  # noqa: ANN202
    """A tiny child with pruned FFNs in layers 0 and 2 refit on 6 sequences in chunks of 4 and 2: (parent, child,
    ids, the weights before, the result, the names of the tensors that moved)."""
    torch.manual_seed(0)
    parent = tiny_parent()
    child = carved(parent, narrow_ffn=(0, 2), no_attention=(), one_kv_head=(1,))
    ids = _ids(6)
    before = snapshot(child)
    result = refit_child_ffns(child, parent, ids, drift=drift, select=select, batch=4)
    after = child.state_dict()
    return parent, child, ids, before, result, {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize("drift", [0.0, 0.5, 1.0])
def test_each_pruned_ffn_is_the_ridge_fit_on_the_stream_the_refit_layers_before_it_produce(drift):
    parent, child, ids, before, result, moved = _refit(drift, select=False)
    assert result.layers == [0, 2] and result.tokens == 6 * 32
    assert moved == {"model.layers.0.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    for layer in (0, 2):  # layer 2's input comes through layer 0's refit FFN: the child's forward now computes it
        w0 = before[f"model.layers.{layer}.mlp.down_proj.weight"]
        want, a, t = _expected(child, parent, ids, layer, w0, drift)
        got = child.model.layers[layer].mlp.down_proj.weight.detach().double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        error = lambda d: float((a @ d.T - t).pow(2).sum() / t.pow(2).sum())  # noqa: E731
        assert result.error_before[layer] == pytest.approx(error(w0.double()), rel=1e-4)
        assert result.error_after[layer] == pytest.approx(error(got), rel=1e-3)
        assert result.error_after[layer] < result.error_before[layer]


@pytest.mark.parametrize("drift", [0.0, 0.5])
def test_with_select_each_pruned_ffn_is_the_parents_obs_choice_on_the_childs_stream(drift):
    from block_library.linear import ridge_lambda
    from puzzle.distill.channel_select import obs_select

    parent, child, ids, before, result, moved = _refit(drift, select=True)
    assert result.layers == [0, 2]
    assert moved <= {f"model.layers.{l}.{n}" for l in (0, 2) for n in
                     ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight")}
    assert "model.layers.2.mlp.down_proj.weight" in moved
    for layer in (0, 2):  # what the elimination chooses from the stream the child's own forward now produces
        h, _ = _captured(child, ids, layer)
        _, p_next = _captured(parent, ids, layer)
        theirs, mine = parent.model.layers[layer], child.model.layers[layer].mlp
        with torch.no_grad():
            n = theirs.post_attention_layernorm(h.float())
            a = (torch.nn.functional.silu(theirs.mlp.gate_proj(n)) * theirs.mlp.up_proj(n)).double()  # (N, D)
            t = theirs.mlp.down_proj(a.float()).double()
        t = t + drift * (p_next - h - t)
        g = a.T @ a
        D, k = a.shape[1], mine.down_proj.weight.shape[1]
        keep, w = obs_select(g, a.T @ t, theirs.mlp.down_proj.weight.double().T, k, ridge_lambda(g, 0.1),
                             group=-(-(D - k) // 256))
        torch.testing.assert_close(mine.gate_proj.weight, theirs.mlp.gate_proj.weight[keep])
        torch.testing.assert_close(mine.up_proj.weight, theirs.mlp.up_proj.weight[keep])
        torch.testing.assert_close(mine.down_proj.weight.detach().double(), w.T, rtol=1e-4, atol=1e-5)
        assert result.error_after[layer] < result.error_before[layer]


def test_the_refit_brings_the_child_closer_on_held_out_tokens_and_leaves_unpruned_children_alone():
    parent = tiny_parent()
    child = carved(parent, narrow_ffn=(0, 1, 2), no_attention=(), one_kv_head=())
    held_out = _ids(8, seed=99)
    kl_before = evaluate_quality(child, held_out, parent=parent)["kl"]
    plain = carved(parent, narrow_ffn=(0, 1, 2), no_attention=(), one_kv_head=())
    refit_child_ffns(plain, parent, _ids(16), drift=0.5, select=False)
    kl_plain = evaluate_quality(plain, held_out, parent=parent)["kl"]
    refit_child_ffns(child, parent, _ids(16), drift=0.5)
    kl_after = evaluate_quality(child, held_out, parent=parent)["kl"]
    assert kl_plain < 0.9 * kl_before, (kl_before, kl_plain)  # measured 0.207 -> 0.174 (random weights and tokens)
    assert kl_after < 0.85 * kl_plain, (kl_plain, kl_after)  # the channels chosen again too: 0.130
    same = carved(parent, narrow_ffn=(), no_attention=(1,), one_kv_head=(2,))  # no pruned FFN: nothing to refit
    before = snapshot(same)
    assert refit_child_ffns(same, parent, _ids(4)).layers == []
    assert_same(same, before)


@pytest.mark.parametrize("select", [False, True])
def test_a_bfloat16_child_is_refit_in_its_own_dtype_to_what_float32_gives(select):
    """Models in bfloat16 (as on a GPU): the chunks' sums are float32 whatever the model's dtype, the weights stay
    bfloat16, and the fit is the float32 one to bfloat16's precision."""
    parent = tiny_parent()
    ids = _ids(6)
    fits = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = parent.to(dtype)
        child = carved(p, narrow_ffn=(0, 2), no_attention=(), one_kv_head=()).to(dtype)
        result = refit_child_ffns(child, p, ids, drift=0.75, select=select, batch=4)
        assert result.layers == [0, 2] and all(result.error_after[l] < result.error_before[l] for l in (0, 2))
        fits[dtype] = child.model.layers[2].mlp.down_proj.weight.detach()
    assert fits[torch.bfloat16].dtype == torch.bfloat16
    err = (fits[torch.bfloat16].float() - fits[torch.float32]).norm() / fits[torch.float32].norm()
    assert err < 0.05, err


def test_bad_settings_are_config_errors_before_any_change():
    parent = tiny_parent()
    child = carved(parent)
    before = snapshot(child)
    for kw in ({"ridge": 0.0}, {"drift": 1.5}, {"batch": 0}):
        with pytest.raises(ConfigError, match="child-stream refit"):
            refit_child_ffns(child, parent, _ids(4), **kw)
    with pytest.raises(ConfigError, match="refit_drift in"):
        ChildBLDConfig(tokens=64, refit=True, refit_drift=-0.1)
    for bad in ({"refit": "yes"}, {"refit_select": 1}):
        with pytest.raises(ConfigError, match="refit and refit_select bools"):
            ChildBLDConfig(tokens=64, **bad)
    assert_same(child, before)


def test_child_bld_with_the_refit_resumes_to_the_same_weights(tmp_path):
    """The refit runs again on a resume; it is deterministic, so the checkpoint's fingerprint still matches."""
    parent, ids = tiny_parent(), _ids(6 * 4)
    cfg = ChildBLDConfig(tokens=6 * 4 * 32, refit=True, **SMALL)
    whole = carved(parent)
    summary = train_child_blocks(whole, parent, ids, cfg, directory=tmp_path / "a").summary()
    assert summary["refit_layers"] == 1 and summary["refit_error_after"] < summary["refit_error_before"]

    class Stop(Exception):
        pass

    def stop(step: int) -> None:
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train_child_blocks(carved(parent), parent, ids, cfg, directory=tmp_path / "b", on_step=stop)
    fresh = carved(parent)
    assert train_child_blocks(fresh, parent, ids, cfg, directory=tmp_path / "b").tokens == 2 * 4 * 32
    assert_same(fresh, snapshot(whole))
    plain = carved(parent)  # without the refit: other starting weights, so another run
    train_child_blocks(plain, parent, ids, ChildBLDConfig(tokens=6 * 4 * 32, **SMALL))
    assert not torch.equal(plain.model.layers[0].mlp.down_proj.weight, whole.model.layers[0].mlp.down_proj.weight)


@pytest.mark.slow  # the real parent and its trained library (shared fixtures)
def test_on_smollm2_the_refit_lowers_a_library_childs_held_out_kl(smollm2, smollm2_tokenizer, smollm2_trained_library):
    from puzzle.data.packing import load_sequences

    lib = smollm2_trained_library
    blocks = [BlockConfig(attention=AttentionConfig.gqa(1) if i in (4, 10, 16) else b.attention,
                          ffn=FFNConfig.swiglu(768) if 8 <= i < 22 else b.ffn)
              for i, b in enumerate(lib.parent_config.blocks)]
    child = lib.assemble(blocks)
    tok = smollm2_tokenizer
    held_out = load_sequences(["stdlib"], tok, seq_len=128, num_sequences=2, split="validation")
    train = load_sequences(["stdlib"], tok, seq_len=128, num_sequences=24, split="train")[8:]  # after calibration
    kl_before = evaluate_quality(child, held_out, parent=smollm2)["kl"]
    plain = lib.assemble(blocks)
    refit_child_ffns(plain, smollm2, train, drift=0.5, select=False)
    kl_plain = evaluate_quality(plain, held_out, parent=smollm2)["kl"]
    result = refit_child_ffns(child, smollm2, train, drift=0.5)
    kl_after = evaluate_quality(child, held_out, parent=smollm2)["kl"]
    assert result.layers == list(range(8, 22))
    assert all(result.error_after[l] < result.error_before[l] for l in result.layers), result.summary()
    assert kl_plain < 0.9 * kl_before, (kl_before, kl_plain)  # measured 0.698 -> 0.600 (2,048 tokens)
    assert kl_after < 0.97 * kl_plain, (kl_plain, kl_after)  # the channels chosen again too: 0.569
