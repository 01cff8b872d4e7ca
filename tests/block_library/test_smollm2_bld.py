"""BLD on the real SmolLM2-135M with the default search space and a small CPU token budget.

Build (calibration, 360 variants initialized and validated) and 2 BLD steps of 8 x 128 tokens:
about 75 s on 2 cores, in the session fixture ``smollm2_trained_library`` (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_library(smollm2_trained_library):
    return smollm2_trained_library  # session-scoped in tests/conftest.py, shared with the scoring tests


def test_default_space_every_trained_variant_improves(smollm2_library):
    t = smollm2_library.table
    assert len(t) == 30 * (4 + 8)
    tr = t[t.trained.astype(bool)]
    assert len(tr) == 30 * (3 - 1 + 7 - 1)  # gqa:1, linear | 5 widths, linear (no-ops have nothing to train)
    worse = tr[tr.final_val_nmse >= tr.init_val_nmse]
    assert worse.empty, worse
    ratio = (tr.final_val_nmse / tr.init_val_nmse).groupby(tr.variant).median()
    assert (ratio.drop("linear") < 0.995).all(), ratio  # gqa / swiglu: real gains, not rounding
    # The table orders quality sensibly: narrower FFNs start worse; the parent's own blocks are exact.
    assert (t[t.is_parent].final_val_nmse == 0).all()
    l5 = t[(t.layer == 5) & t.variant.str.startswith("swiglu")].sort_values("params")
    assert l5.init_val_nmse.is_monotonic_decreasing


def test_trained_child_is_closer_to_the_parent_than_its_initialization(smollm2_library, smollm2, smollm2_tokenizer):
    from puzzle.data import load_sequences

    lib = smollm2_library
    parent_blocks = smollm2.config.blocks
    with torch.no_grad():
        assert torch.equal(lib.assemble(parent_blocks)(torch.tensor([[1, 2, 3, 4]])).logits,
                           smollm2(torch.tensor([[1, 2, 3, 4]])).logits)
    blocks = [BlockConfig(attention=AttentionConfig.gqa(1) if i % 2 else b.attention, ffn=FFNConfig.swiglu(1024))
              for i, b in enumerate(parent_blocks)]
    ids = load_sequences(["stdlib"], smollm2_tokenizer, seq_len=128, num_sequences=4, split="validation")
    with torch.no_grad():
        p = F.log_softmax(smollm2(ids).logits.float(), -1)

        def kl(model):
            q = F.log_softmax(model(ids).logits.float(), -1)
            return float((p.exp() * (p - q)).sum(-1).mean())

        kl_init, kl_trained = kl(lib.assemble(blocks, initial=True)), kl(lib.assemble(blocks))
    assert 0 < kl_trained < kl_init, (kl_init, kl_trained)


def test_ffn_refit_lowers_held_out_error_of_pruned_smollm2_ffns(smollm2, smollm2_tokenizer):
    """bld.ffn_refit on the library's calibration tokens (16 x 256, train split): at half and quarter width the
    pruned FFN of layers 5, 15 and 25 writes closer to the parent's on validation text than the plain copy."""
    from block_library.calibration import StatsCollector
    from block_library.registry import initialize
    from block_library.variant import Variant, build_module
    from puzzle.data import load_sequences

    layers = (5, 15, 25)
    blocks = smollm2.model.layers

    def ffn_inputs(ids):  # the residual stream entering each layer's FFN sub-block: {l: (B, T, H)}
        seen, hooks = {}, []
        for l in layers:
            hooks.append(blocks[l].post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, l=l: seen.setdefault(l, []).append(a[0])))
        with torch.no_grad():
            for c in range(0, ids.shape[0], 4):
                smollm2(ids[c:c + 4], use_cache=False)
        for h in hooks:
            h.remove()
        return {l: torch.cat(v) for l, v in seen.items()}

    calib = ffn_inputs(load_sequences(["stdlib"], smollm2_tokenizer, seq_len=256, num_sequences=16))
    val = ffn_inputs(load_sequences(["stdlib"], smollm2_tokenizer, seq_len=256, num_sequences=4, split="validation"))
    collector = StatsCollector({l: {"ffn_importance", "ffn_gram"} for l in layers}, eps=1e-5, ridge=1e-3)
    for l in layers:
        collector(l, calib[l], calib[l], calib[l], {}, block=blocks[l])
    collector.count(calib[layers[0]].shape[0] * calib[layers[0]].shape[1])
    copy_stats = type(collector.stats)(tokens=collector.stats.tokens, ffn_act_abs_sum=collector.stats.ffn_act_abs_sum)
    ratios = []
    with torch.no_grad():
        for l in layers:
            h = val[l]
            want = blocks[l].mlp(blocks[l].post_attention_layernorm(h))
            for width in (768, 384):
                v = Variant(l, "ffn", FFNConfig.swiglu(width))
                err = {}
                for name, stats in (("copy", copy_stats), ("refit", collector.stats)):
                    m = initialize(build_module(v, smollm2.config), blocks[l], v, stats)
                    err[name] = float((m(h, {}) - h - want).pow(2).sum() / want.pow(2).sum())
                ratios.append(err["refit"] / err["copy"])
    assert max(ratios) < 0.95 and sum(ratios) / len(ratios) < 0.8, ratios
