"""Exact weight fusion: a fused block is the parallel sum of its members, bit for bit up to rounding."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from puzzle.errors import ConfigError
from puzzle.export import export_decilm
from puzzle.fusion import Segment, fuse_model
from puzzle.fusion.fuse import parallel_reference, sequential_reference
from puzzle.loading import load_model
from tests.fusion.tiny import H, block_ctx, free, gqa, ids_for, tiny_model

NO_CTX = {"cos": None, "sin": None, "mask": None, "cache": None}


def hand_ffn(model, i: int, x: torch.Tensor) -> torch.Tensor:
    """Layer i's FFN on its own normalized input, written out from the weights (no module calls)."""
    layer = model.model.layers[i]
    eps = model.config.rms_norm_eps
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * layer.post_attention_layernorm.weight
    mlp = layer.mlp
    g = F.linear(n, mlp.gate_proj.weight, mlp.gate_proj.bias)
    u = F.linear(n, mlp.up_proj.weight, mlp.up_proj.bias)
    return F.linear(F.silu(g) * u, mlp.down_proj.weight, mlp.down_proj.bias)


def hand_parallel_logits(model, ids: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
    """The original model, with each segment computed as x + sum_k FFN_k(norm_k(x)) on its input."""
    ctx = block_ctx(model, ids)
    starts = {s.start: s for s in segments}
    x = model.model.embed_tokens(ids)
    i = 0
    while i < len(model.model.layers):
        s = starts.get(i)
        if s is None:
            x = model.model.layers[i](x, ctx)
            i += 1
        else:
            x = x + sum(hand_ffn(model, k, x) for k in s.layers)
            i = s.stop
    return model.lm_head(model.model.norm(x))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_fused_block_equals_parallel_sum_with_distinct_norm_weights():
    model = tiny_model()
    seg = Segment(1, 4)
    norms = [model.model.layers[i].post_attention_layernorm.weight for i in seg.layers]
    assert all(not torch.allclose(a, b) for a, b in zip(norms, norms[1:]))  # the folding has work to do
    assert all(not torch.allclose(w, torch.ones(H)) for w in norms)
    fused = fuse_model(model, [seg])
    block = fused.model.layers[1]
    assert block.spec["attention"] == "no_op" and not hasattr(block, "self_attn")
    assert torch.equal(block.post_attention_layernorm.weight, torch.ones(H))
    x = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = block(x, NO_CTX)
        ref = parallel_reference(model, seg, x)
        hand = x + sum(hand_ffn(model, i, x) for i in seg.layers)
    assert (out - ref).abs().max().item() < 1e-5
    assert (out - hand).abs().max().item() < 1e-5
    # ... and it is not the sequential computation (the approximation is real on this model)
    with torch.no_grad():
        seq = sequential_reference(model, seg, x)
    assert (out - seq).abs().max().item() > 1e-2


def test_fused_width_is_the_sum_of_widths():
    model = tiny_model()
    fused = fuse_model(model, [Segment(1, 4), Segment(5, 7)])
    widths = [b.ffn.intermediate_size for b in fused.config.blocks]
    assert widths == [48, 48 + 64 + 32, 48, 40 + 24]
    assert fused.config.num_hidden_layers == 4 and len(fused.model.layers) == 4
    mlp = fused.model.layers[1].mlp
    assert tuple(mlp.gate_proj.weight.shape) == (144, H) and tuple(mlp.up_proj.weight.shape) == (144, H)
    assert tuple(mlp.down_proj.weight.shape) == (H, 144)
    assert [b.attention.kind for b in fused.config.blocks] == ["gqa", "no_op", "gqa", "no_op"]
    # the down projection is the members' side by side: block 2's columns are 48..111
    torch.testing.assert_close(mlp.down_proj.weight[:, 48:112], model.model.layers[2].mlp.down_proj.weight,
                               atol=0, rtol=0)
    # gate rows carry the member's norm scale folded in
    w2 = model.model.layers[2].post_attention_layernorm.weight
    torch.testing.assert_close(mlp.gate_proj.weight[48:112], model.model.layers[2].mlp.gate_proj.weight * w2,
                               atol=1e-7, rtol=1e-6)


def test_run_of_one_leaves_the_model_unchanged():
    model = tiny_model()
    ids = ids_for()
    for segments in ([Segment(2, 3)], [], [Segment(1, 2), Segment(5, 6)]):
        same = fuse_model(model, segments)
        assert same.config.block_configs == model.config.block_configs
        assert torch.equal(logits(same, ids), logits(model, ids))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("segments", [[Segment(1, 4), Segment(5, 7)], [Segment(2, 4)], [Segment(1, 3)]])
def test_fused_model_is_the_parallel_forward_of_the_original(segments, tied):
    model = tiny_model(tie_word_embeddings=tied)
    fused = fuse_model(model, segments)
    ids = ids_for(shape=(2, 10))
    got, unfused = logits(fused, ids), logits(model, ids)
    with torch.no_grad():
        want = hand_parallel_logits(model, ids, segments)
    assert got.shape == (2, 10, 64)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - unfused).abs().max().item() > 1e-3  # parallel is an approximation of sequential
    if tied:
        assert fused.lm_head.weight.data_ptr() == fused.model.embed_tokens.weight.data_ptr()


def test_mlp_bias_fusion_is_exact_and_sums_down_biases():
    model = tiny_model(mlp_bias=True)
    seg = Segment(1, 4)
    assert model.model.layers[1].mlp.down_proj.bias.abs().sum() > 0  # the biases are not zero
    fused = fuse_model(model, [seg])
    mlp = fused.model.layers[1].mlp
    down_sum = sum(model.model.layers[i].mlp.down_proj.bias for i in seg.layers)
    torch.testing.assert_close(mlp.down_proj.bias, down_sum, atol=1e-6, rtol=0)
    torch.testing.assert_close(mlp.gate_proj.bias[48:112], model.model.layers[2].mlp.gate_proj.bias, atol=0, rtol=0)
    x = torch.randn(2, 6, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = fused.model.layers[1](x, NO_CTX)
        hand = x + sum(hand_ffn(model, i, x) for i in seg.layers)
    assert (out - hand).abs().max().item() < 1e-5
    ids = ids_for()
    with torch.no_grad():
        want = hand_parallel_logits(model, ids, [seg])
    assert (logits(fused, ids) - want).abs().max().item() < 1e-5


def test_fuse_model_does_not_modify_the_original():
    model = tiny_model(mlp_bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    configs = json.dumps(model.config.block_configs)
    ids = ids_for()
    ref = logits(model, ids)
    fused = fuse_model(model, [Segment(1, 4), Segment(5, 7)])
    logits(fused, ids)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.dumps(model.config.block_configs) == configs
    assert len(model.model.layers) == 7
    assert torch.equal(logits(model, ids), ref)


def test_fused_dtype_is_kept():
    model = tiny_model().to(torch.bfloat16)
    fused = fuse_model(model, [Segment(1, 4)])
    assert {p.dtype for p in fused.parameters()} == {torch.bfloat16}
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        out = fused.model.layers[1](x, NO_CTX).float()
        ref = parallel_reference(model.float(), Segment(1, 4), x.float())
    assert (out - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_export_and_reload_is_exact(tmp_path):
    model = tiny_model()
    fused = fuse_model(model, [Segment(1, 4), Segment(5, 7)])
    out = export_decilm(fused, tmp_path / "fused")
    cfg = json.loads((out / "config.json").read_text())
    blocks = cfg["block_configs"]
    assert cfg["num_hidden_layers"] == 4 and len(blocks) == 4
    assert blocks[1]["attention"] == {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
    assert blocks[1]["ffn"]["ffn_mult"] == pytest.approx(3 * 144 / (2 * H)) == 6.75
    assert blocks[1]["ffn"]["intermediate_size"] == 144  # not a multiple of 256: kept explicitly
    assert blocks[3]["attention"]["no_op"] is True and blocks[3]["ffn"]["ffn_mult"] == 3.0
    assert blocks[0]["attention"]["no_op"] is False and blocks[0]["attention"]["n_heads_in_group"] == 2
    reloaded = load_model(out)
    assert reloaded.config.blocks == fused.config.blocks
    ids = ids_for(shape=(2, 9))
    a, b = logits(reloaded, ids), logits(fused, ids)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("segment", [Segment(0, 3), Segment(3, 5), Segment(4, 5), Segment(0, 1)])
def test_fusing_an_attention_layer_is_a_config_error(segment):
    model = tiny_model()
    with pytest.raises(ConfigError, match="attention"):
        fuse_model(model, [segment])


def test_bad_segments_are_config_errors():
    model = tiny_model()
    with pytest.raises(ConfigError, match="past the last layer"):
        fuse_model(model, [Segment(5, 8)])
    with pytest.raises(ConfigError, match="overlap"):
        fuse_model(model, [Segment(1, 3), Segment(2, 4)])
    linear_ffn = [gqa(), free(48), {"attention": {"kind": "no_op"}, "ffn": {"kind": "linear"}}, free(32)]
    with pytest.raises(ConfigError, match="not attention-free SwiGLU"):
        fuse_model(tiny_model(linear_ffn), [Segment(1, 4)])
