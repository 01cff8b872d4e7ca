"""Initialization from the parent: KV pooling, FFN pruning, least squares, no-op, parent copies."""

from __future__ import annotations

import pytest
import torch

from block_library.attention import pool_kv_heads
from block_library.calibration import StatsCollector
from block_library.ffn import channel_importance, kept_channels
from block_library.linear import ridge_lambda
from block_library.registry import initialize
from block_library.variant import Variant, build_module
from puzzle.model import PuzzleConfig
from puzzle.model.modeling import DecoderBlock, RotaryEmbedding
from puzzle.schema import AttentionConfig, FFNConfig


def config(**kw) -> PuzzleConfig:
    base = dict(vocab_size=32, hidden_size=48, num_attention_heads=8, num_key_value_heads=4, intermediate_size=40,
                num_hidden_layers=1, rms_norm_eps=1e-6)
    return PuzzleConfig(**{**base, **kw})


def parent_block(cfg: PuzzleConfig, seed: int = 0) -> DecoderBlock:
    torch.manual_seed(seed)
    block = DecoderBlock(cfg, cfg.resolved_blocks()[0], cache_slot=0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return block.eval()


def ctx_for(cfg: PuzzleConfig, B: int, T: int) -> dict:
    cos, sin = RotaryEmbedding(cfg.rope_parameters, cfg.head_dim)(torch.arange(T)[None].expand(B, T), torch.float32)
    return {"cos": cos, "sin": sin, "mask": None, "cache": None}


def attention_out(block, x, ctx):
    return x + block.self_attn(block.input_layernorm(x), ctx)


def ffn_out(block, x):
    return x + block.mlp(block.post_attention_layernorm(x))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_kv_pooling_is_exact_when_pooled_heads_are_identical(qkv_bias):
    cfg = config(qkv_bias=qkv_bias)
    parent = parent_block(cfg)
    hd = cfg.head_dim
    with torch.no_grad():  # make KV heads 2j and 2j+1 identical (j = 0, 1)
        for proj in (parent.self_attn.k_proj, parent.self_attn.v_proj):
            for t in [proj.weight] + ([proj.bias] if qkv_bias else []):
                heads = t.view(4, hd, *t.shape[1:])
                heads[1].copy_(heads[0])
                heads[3].copy_(heads[2])
    v = Variant(0, "attention", AttentionConfig.gqa(2))
    child = initialize(build_module(v, cfg), parent, v, None)
    x, ctx = torch.randn(2, 10, 48), ctx_for(cfg, 2, 10)
    with torch.no_grad():
        torch.testing.assert_close(child(x, ctx), attention_out(parent, x, ctx), atol=1e-6, rtol=0)
        # ...and not exact when the heads differ: the test can fail.
        other = parent_block(cfg, seed=1)
        child2 = initialize(build_module(v, cfg), other, v, None)
        assert (child2(x, ctx) - attention_out(other, x, ctx)).abs().max() > 1e-3


def test_kv_pooling_means_groups_and_expansion_repeats():
    w = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4 * 3, 2)  # 4 heads of dim 3
    pooled = pool_kv_heads(w, n_kv=4, k=2, head_dim=3)
    torch.testing.assert_close(pooled[:3], (w[0:3] + w[3:6]) / 2)
    torch.testing.assert_close(pooled[3:], (w[6:9] + w[9:12]) / 2)
    expanded = pool_kv_heads(w, n_kv=4, k=8, head_dim=3)
    torch.testing.assert_close(expanded[3:6], w[0:3])
    cfg = config()
    parent = parent_block(cfg)
    v = Variant(0, "attention", AttentionConfig.gqa(8))  # more heads than the parent: exact
    child = initialize(build_module(v, cfg), parent, v, None)
    x, ctx = torch.randn(1, 7, 48), ctx_for(cfg, 1, 7)
    with torch.no_grad():
        torch.testing.assert_close(child(x, ctx), attention_out(parent, x, ctx), atol=1e-6, rtol=0)


def _ffn_stats(cfg, parent, x):
    collector = StatsCollector({0: {"ffn_importance"}}, eps=cfg.rms_norm_eps, ridge=1e-3)
    collector(0, x, x, ffn_out(parent, x), {}, block=parent)
    collector.count(x.shape[0] * x.shape[1])
    return collector.stats


def test_ffn_pruning_to_full_width_reproduces_the_parent_exactly():
    cfg = config(mlp_bias=True)
    parent = parent_block(cfg)
    x = torch.randn(2, 9, 48)
    v = Variant(0, "ffn", FFNConfig.swiglu(40))
    child = initialize(build_module(v, cfg), parent, v, _ffn_stats(cfg, parent, x))
    with torch.no_grad():
        assert torch.equal(child(x, {}), ffn_out(parent, x))


def test_ffn_pruning_keeps_the_most_important_channels():
    cfg = config()
    parent = parent_block(cfg)
    x = torch.randn(3, 11, 48)
    stats = _ffn_stats(cfg, parent, x)
    with torch.no_grad():  # importance by hand: mean |silu(gate x) * up x| * ||down[:, c]||
        xn = parent.post_attention_layernorm(x)
        act = torch.nn.functional.silu(parent.mlp.gate_proj(xn)) * parent.mlp.up_proj(xn)
        want = act.abs().mean(dim=(0, 1)).double() * parent.mlp.down_proj.weight.double().norm(dim=0)
    got = channel_importance(stats.ffn_act_abs_sum[0] / stats.tokens, parent.mlp.down_proj.weight)
    torch.testing.assert_close(got, want)
    keep = kept_channels(got, 16)
    assert keep.tolist() == sorted(torch.topk(want, 16).indices.tolist())
    v = Variant(0, "ffn", FFNConfig.swiglu(16))
    child = initialize(build_module(v, cfg), parent, v, stats)
    with torch.no_grad():  # the pruned FFN is the parent with the other channels' down columns zeroed
        masked = parent_block(cfg)
        dropped = [c for c in range(40) if c not in keep.tolist()]
        masked.mlp.down_proj.weight[:, dropped] = 0
        torch.testing.assert_close(child(x, {}), ffn_out(masked, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("subblock", ["attention", "ffn"])
def test_linear_init_matches_lstsq(subblock):
    cfg = config()
    parent = parent_block(cfg)
    x, ctx = torch.randn(4, 16, 48), ctx_for(cfg, 4, 16)
    with torch.no_grad():
        h = attention_out(parent, x, ctx)
        y = ffn_out(parent, h)
    collector = StatsCollector({0: {f"lsq:{subblock}"}}, eps=cfg.rms_norm_eps, ridge=1e-2)
    collector(0, x, h, y, ctx, block=parent)
    v = Variant(0, subblock, AttentionConfig.linear() if subblock == "attention" else FFNConfig.linear())
    child = initialize(build_module(v, cfg), parent, v, collector.stats)
    with torch.no_grad():
        if subblock == "attention":
            X, Y = parent.input_layernorm(x), h - x
            W = child.self_attn.linear_attn.weight
        else:
            X, Y = parent.post_attention_layernorm(h), y - h
            W = child.mlp.linear_mlp.weight
        X, Y = X.reshape(-1, 48).double(), Y.reshape(-1, 48).double()
        lam = ridge_lambda(X.T @ X, 1e-2)
        A = torch.cat([X, lam**0.5 * torch.eye(48, dtype=torch.float64)])
        B = torch.cat([Y, torch.zeros(48, 48, dtype=torch.float64)])
        want = torch.linalg.lstsq(A, B).solution.T  # (out, in)
    torch.testing.assert_close(W.double(), want, atol=1e-5, rtol=1e-4)


def test_parent_variant_is_a_copy_and_no_op_is_identity():
    cfg = config()
    parent = parent_block(cfg)
    x, ctx = torch.randn(2, 5, 48), ctx_for(cfg, 2, 5)
    va = Variant(0, "attention", AttentionConfig.gqa(4), is_parent=True)
    vf = Variant(0, "ffn", FFNConfig.swiglu(40), is_parent=True)
    a = initialize(build_module(va, cfg), parent, va, None)
    f = initialize(build_module(vf, cfg), parent, vf, None)
    with torch.no_grad():
        assert torch.equal(a(x, ctx), attention_out(parent, x, ctx))
        assert torch.equal(f(x, {}), ffn_out(parent, x))
    vn = Variant(0, "ffn", FFNConfig.no_op())
    n = initialize(build_module(vn, cfg), parent, vn, None)
    assert not list(n.parameters()) and torch.equal(n(x, {}), x)


def _refit_stats(cfg, parent, x, ridge):
    collector = StatsCollector({0: {"ffn_importance", "ffn_gram"}}, eps=cfg.rms_norm_eps, ridge=1e-3, ffn_ridge=ridge)
    collector(0, x, x, ffn_out(parent, x), {}, block=parent)
    collector.count(x.shape[0] * x.shape[1])
    return collector.stats


def test_ffn_refit_matches_ridge_regression_towards_the_copy():
    """down_K' = argmin ||A down^T - A_K d^T||^2 + lam ||d - down_K||^2, solved by lstsq on stacked rows."""
    cfg = config()
    parent = parent_block(cfg)
    x = torch.randn(3, 11, 48)
    stats = _refit_stats(cfg, parent, x, ridge=1e-2)
    v = Variant(0, "ffn", FFNConfig.swiglu(16))
    child = initialize(build_module(v, cfg), parent, v, stats)
    keep = kept_channels(channel_importance(stats.ffn_act_abs_sum[0] / stats.tokens, parent.mlp.down_proj.weight), 16)
    with torch.no_grad():
        xn = parent.post_attention_layernorm(x)
        act = (torch.nn.functional.silu(parent.mlp.gate_proj(xn)) * parent.mlp.up_proj(xn)).reshape(-1, 40).double()
        torch.testing.assert_close(stats.ffn_gram[0], act.T @ act)
        W = parent.mlp.down_proj.weight.double()  # (H, m)
        A_k = act[:, keep]
        lam = 1e-2 * float((A_k.T @ A_k).diagonal().mean())
        lhs = torch.cat([A_k, lam**0.5 * torch.eye(16, dtype=torch.float64)])  # rows: tokens, then the ridge
        rhs = torch.cat([act @ W.T, lam**0.5 * W[:, keep].T])
        want = torch.linalg.lstsq(lhs, rhs).solution.T  # (H, k)
        torch.testing.assert_close(child.mlp.down_proj.weight.double(), want, atol=1e-5, rtol=1e-4)
        # and it writes closer to the whole FFN than the plain copy on these tokens: the refit can fail this
        copy = initialize(build_module(v, cfg), parent, v, _ffn_stats(cfg, parent, x))
        target = ffn_out(parent, x)
        err_refit = (child(x, {}) - target).pow(2).sum()
        err_copy = (copy(x, {}) - target).pow(2).sum()
        assert err_refit < 0.9 * err_copy


def test_ffn_refit_with_a_huge_ridge_is_the_copy_and_full_width_is_the_parent():
    cfg = config()
    parent = parent_block(cfg)
    x = torch.randn(2, 9, 48)
    v = Variant(0, "ffn", FFNConfig.swiglu(16))
    far = initialize(build_module(v, cfg), parent, v, _refit_stats(cfg, parent, x, ridge=1e9))
    copy = initialize(build_module(v, cfg), parent, v, _ffn_stats(cfg, parent, x))
    torch.testing.assert_close(far.mlp.down_proj.weight, copy.mlp.down_proj.weight, atol=1e-6, rtol=0)
    full = Variant(0, "ffn", FFNConfig.swiglu(40))
    child = initialize(build_module(full, cfg), parent, full, _refit_stats(cfg, parent, x, ridge=1e-3))
    with torch.no_grad():
        assert torch.equal(child(x, {}), ffn_out(parent, x))
