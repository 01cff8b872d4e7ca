"""Pairwise dependency, parallel error, and architectures derived by dropping sub-blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from puzzle.errors import ConfigError
from puzzle.fusion import Segment, fuse_model
from puzzle.fusion.dependency import parallel_error, run_dependency, run_inputs
from puzzle.fusion.derive import derive_model, without_attention
from puzzle.fusion.fuse import sequential_reference
from puzzle.schema import BlockConfig, FFNConfig
from tests.fusion.tiny import block_ctx, free, gqa, ids_for, tiny_model

NO_CTX = {"cos": None, "sin": None, "mask": None, "cache": None}
RUN = Segment(1, 4)  # layers 1-3 of tests.fusion.tiny.BLOCKS, widths 48, 64, 32


def x0_for(model, n: int = 3, t: int = 6) -> torch.Tensor:
    return run_inputs(model, ids_for(seed=7, shape=(n, t)), [RUN.start])[RUN.start]


def zero_down(model, layer: int) -> None:
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight.zero_()


def test_run_inputs_are_the_residual_stream_entering_each_layer():
    model = tiny_model()
    ids = ids_for(shape=(2, 8))
    got = run_inputs(model, ids, [0, 1, 4])
    assert sorted(got) == [0, 1, 4]
    ctx = block_ctx(model, ids)
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        assert torch.equal(got[0], x)
        for i in range(4):
            x = model.model.layers[i](x, ctx)
            if i == 0:
                torch.testing.assert_close(got[1], x, atol=1e-6, rtol=0)
    torch.testing.assert_close(got[4], x, atol=1e-6, rtol=0)


def test_dependency_matrix_shape_range_and_direct_formula():
    model = tiny_model()
    x0 = x0_for(model)
    dep = run_dependency(model, RUN, x0)
    m = dep.matrix
    assert dep.tokens == 3 * 6 and dep.widths == [48, 64, 32] and dep.run == RUN
    assert len(m) == 3 and all(len(row) == 3 for row in m)
    for i in range(3):
        for j in range(3):
            if j <= i:
                assert m[i][j] == 0.0
            else:
                assert 0.0 <= m[i][j] <= 2.0
    assert min(m[0][1], m[0][2], m[1][2]) > 1e-4  # a random model's FFNs do depend on each other
    # d[0][2] written out: 1 - cos(f_2, FFN_2(norm_2(x_2 - f_0))), averaged over tokens
    b = [model.model.layers[i] for i in RUN.layers]
    with torch.no_grad():
        f0 = b[0].mlp(b[0].post_attention_layernorm(x0))
        x1 = x0 + f0
        x2 = x1 + b[1].mlp(b[1].post_attention_layernorm(x1))
        f2 = b[2].mlp(b[2].post_attention_layernorm(x2))
        g2 = b[2].mlp(b[2].post_attention_layernorm(x2 - f0))
        want = (1 - F.cosine_similarity(f2, g2, dim=-1)).mean().item()
    assert m[0][2] == pytest.approx(want, rel=1e-4, abs=1e-7)
    d = dep.to_dict()
    assert d["run"] == "1-3" and d["start"] == 1 and d["stop"] == 4 and d["matrix"] == m


def test_dependency_does_not_depend_on_chunking():
    model = tiny_model()
    x0 = x0_for(model, n=5)
    a = run_dependency(model, RUN, x0, chunk=1)
    b = run_dependency(model, RUN, x0, chunk=4)
    assert a.tokens == b.tokens == 5 * 6
    for ra, rb in zip(a.matrix, b.matrix):
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("silent", [0, 1])
def test_a_silent_ffn_has_no_dependents(silent):
    """FFN ``silent`` outputs exactly zero: removing it changes no later FFN's input."""
    model = tiny_model()
    zero_down(model, RUN.start + silent)
    m = run_dependency(model, RUN, x0_for(model)).matrix
    for j in range(silent + 1, 3):
        assert abs(m[silent][j]) <= 1e-7, m
    others = [m[i][j] for i in range(3) for j in range(i + 1, 3) if i != silent and j != silent]
    assert all(v > 1e-4 for v in others)  # the rest of the run still depends


@pytest.mark.parametrize("alive", [0, 1, 2])
def test_parallel_error_is_zero_when_one_ffn_does_all_the_work(alive):
    """With every other FFN silent, the live FFN sees the segment input in both orders."""
    model = tiny_model()
    for k in range(3):
        if k != alive:
            zero_down(model, RUN.start + k)
    x0 = x0_for(model)
    assert parallel_error(model, RUN, x0) == 0.0
    with torch.no_grad():
        assert (sequential_reference(model, RUN, x0) - x0).abs().max() > 1e-2  # the update is not zero


def test_parallel_error_of_a_live_run_matches_the_fused_block():
    model = tiny_model()
    x0 = x0_for(model, n=5)
    err = parallel_error(model, RUN, x0, chunk=2)
    assert 1e-3 < err < 10
    fused = fuse_model(model, [RUN])
    with torch.no_grad():
        seq = sequential_reference(model, RUN, x0)
        out = fused.model.layers[1](x0, NO_CTX)
    want = ((seq - out).double().norm() / (seq - x0).double().norm()).item()
    assert err == pytest.approx(want, rel=1e-4)
    assert parallel_error(model, RUN, x0, chunk=1) == pytest.approx(err, rel=1e-6)
    assert parallel_error(model, Segment(2, 3), x0) == 0.0  # a single layer is its own parallel sum


# ------------------------------------------------------------------------------------------ derive


def hand_logits_without_attention(model, ids, dropped: set[int]) -> torch.Tensor:
    ctx = block_ctx(model, ids)
    x = model.model.embed_tokens(ids)
    for i, layer in enumerate(model.model.layers):
        if i in dropped:
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        else:
            x = layer(x, ctx)
    return model.lm_head(model.model.norm(x))


@pytest.mark.parametrize("dropped", [{1}, {0, 2}, {0, 1, 2, 3}])
def test_derive_model_dropping_attention(dropped):
    model = tiny_model([gqa(48), gqa(64), gqa(32), gqa(40)])
    blocks = without_attention(model.config.blocks, dropped)
    assert [b.attention.kind == "no_op" for b in blocks] == [i in dropped for i in range(4)]
    assert [b.ffn for b in blocks] == [b.ffn for b in model.config.blocks]
    derived = derive_model(model, blocks)
    assert derived.config.blocks == blocks
    names = set(derived.state_dict())
    for i in range(4):
        assert (f"model.layers.{i}.self_attn.q_proj.weight" in names) == (i not in dropped)
        assert (f"model.layers.{i}.input_layernorm.weight" in names) == (i not in dropped)
    ids = ids_for(shape=(2, 10))
    with torch.no_grad():
        got = derived(ids, use_cache=False).logits
        want = hand_logits_without_attention(model, ids, dropped)
        orig = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - orig).abs().max() > 1e-3
    # the derived run can then be fused
    if dropped == {0, 1, 2, 3}:
        fused = fuse_model(derived, [Segment(0, 4)])
        assert [b.ffn.intermediate_size for b in fused.config.blocks] == [48 + 64 + 32 + 40]


def test_derive_model_same_blocks_and_dropped_ffn():
    model = tiny_model([gqa(48), gqa(64), gqa(32)], tie_word_embeddings=True)
    ids = ids_for()
    same = derive_model(model, model.config.blocks)
    with torch.no_grad():
        assert torch.equal(same(ids).logits, model(ids).logits)
    blocks = model.config.blocks
    blocks[1] = BlockConfig(attention=blocks[1].attention, ffn=FFNConfig.no_op())
    derived = derive_model(model, blocks)
    assert not hasattr(derived.model.layers[1], "mlp") and not hasattr(derived.model.layers[1], "post_attention_layernorm")
    ctx = block_ctx(model, ids)
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        x = model.model.layers[0](x, ctx)
        l1 = model.model.layers[1]
        x = x + l1.self_attn(l1.input_layernorm(x), ctx)
        x = model.model.layers[2](x, ctx)
        want = model.lm_head(model.model.norm(x))
        torch.testing.assert_close(derived(ids).logits, want, atol=1e-6, rtol=0)


def test_derive_model_refuses_what_needs_a_library():
    model = tiny_model([gqa(48), gqa(64), free(32)])
    blocks = model.config.blocks
    wider = list(blocks)
    wider[2] = BlockConfig(attention=blocks[2].attention, ffn=FFNConfig.swiglu(96))
    with pytest.raises(ConfigError, match="--library"):
        derive_model(model, wider)
    fewer_kv = list(blocks)
    fewer_kv[0] = BlockConfig(attention=type(blocks[0].attention).gqa(1), ffn=blocks[0].ffn)
    with pytest.raises(ConfigError, match="--library"):
        derive_model(model, fewer_kv)
    with pytest.raises(ConfigError, match="has 2 layers but the model has 3"):
        derive_model(model, blocks[:2])


@pytest.mark.parametrize("layers", [[7], [-1], [0, 3]])
def test_without_attention_bad_layer(layers):
    blocks = tiny_model([gqa(48), gqa(64), gqa(32)]).config.blocks
    with pytest.raises(ConfigError, match="do not exist"):
        without_attention(blocks, layers)


def test_without_attention_on_attention_free_layer_is_a_no_op():
    blocks = tiny_model([gqa(48), free(64)]).config.blocks
    assert without_attention(blocks, [1]) == blocks
    assert without_attention(blocks, []) == blocks
