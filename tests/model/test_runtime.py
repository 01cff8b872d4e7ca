"""The heterogeneous runtime: exact math vs an independent reference, KV cache, generate()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from puzzle.model import PuzzleConfig, PuzzleForCausalLM
from puzzle.model.modeling import rope_inverse_frequencies
from puzzle.summary import layer_table, totals
from tests.model.reference import reference_logits

HETERO_BLOCKS = [
    {"attention": {"kind": "no_op"}, "ffn": {"kind": "swiglu", "intermediate_size": 64}},
    {"attention": {"kind": "gqa", "num_key_value_heads": 4}, "ffn": {"kind": "swiglu", "intermediate_size": 96}},
    {"attention": {"kind": "linear"}, "ffn": {"kind": "no_op"}},
    {"attention": {"kind": "gqa", "num_key_value_heads": 1}, "ffn": {"kind": "linear"}},
    {"attention": {"kind": "gqa", "num_key_value_heads": 2}, "ffn": {"kind": "swiglu", "intermediate_size": 32}},
    {"attention": {"kind": "no_op"}, "ffn": {"kind": "no_op"}},
]
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def hetero_model(seed: int = 0, **overrides) -> PuzzleForCausalLM:
    kwargs = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, block_configs=HETERO_BLOCKS, initializer_range=0.2,
                  rope_parameters=LLAMA3_ROPE, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = PuzzleForCausalLM(PuzzleConfig(**{**kwargs, **overrides})).eval()
    with torch.no_grad():  # non-trivial norm scales
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_heterogeneous_logits_match_independent_reference(tied):
    model = hetero_model(tie_word_embeddings=tied)
    ids = torch.randint(0, 128, (2, 40))  # 40 > 32 exercises every llama3 frequency band
    with torch.no_grad():
        got = model(ids).logits
    inv_freq = rope_inverse_frequencies(model.config.rope_parameters, model.config.head_dim)
    want = reference_logits(model.state_dict(), model.config, ids, inv_freq)
    assert got.shape == (2, 40, 128)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def test_llama3_rope_bands_differ_from_default():
    inv_default = rope_inverse_frequencies({"rope_type": "default", "rope_theta": 10000.0}, 16)
    inv_llama3 = rope_inverse_frequencies(LLAMA3_ROPE, 16)
    assert torch.equal(inv_llama3[0], inv_default[0])  # high frequency kept
    torch.testing.assert_close(inv_llama3[-1], inv_default[-1] / 8)  # low frequency divided by factor
    assert inv_default[1] / 8 < inv_llama3[1] < inv_default[1]  # blended band


def test_kv_cache_decode_equals_full_forward():
    model = hetero_model()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # (2, 12, V)
        out = model(ids[:, :7], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(7, 12):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)
    # Only the 3 GQA layers use the cache, in slots 0..2; the first layer (no-op attention) has none.
    assert cache.get_seq_length() == 12
    assert sum(1 for layer in cache.layers if layer.is_initialized) == 3


def test_generate_with_cache_equals_generate_without_and_manual_greedy():
    model = hetero_model()
    prompt = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=15, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=15, do_sample=False, use_cache=False)
        seq = prompt
        for _ in range(15):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, seq)
    assert cached.shape == (1, 24)


def test_left_padded_batch_matches_single_sequences():
    model = hetero_model()
    a, b = torch.randint(0, 128, (1, 10)), torch.randint(0, 128, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        gen = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
        gen_a = model.generate(a, max_new_tokens=8, do_sample=False)
        gen_b = model.generate(b, max_new_tokens=8, do_sample=False)
        logits = model(batch, attention_mask=mask, use_cache=False).logits
        logits_b = model(b, use_cache=False).logits
    assert torch.equal(gen[0], gen_a[0])
    assert torch.equal(gen[1, 4:], gen_b[0])
    assert torch.isfinite(logits).all()  # padded rows stay finite
    torch.testing.assert_close(logits[1, 4:], logits_b[0], atol=1e-5, rtol=0)


def test_model_without_any_attention_generates():
    blocks = [{"attention": {"kind": "no_op"}, "ffn": {"kind": "swiglu", "intermediate_size": 32}}] * 3
    model = hetero_model(block_configs=blocks)
    prompt = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=4, do_sample=False)
        # Without attention each position only sees itself: the next token is a function of the last one.
        last = model(out[:, -5:-4], use_cache=False).logits.argmax(-1)
    assert out.shape == (2, 9)
    assert torch.equal(last[:, 0], out[:, -4])


def test_labels_give_shifted_cross_entropy():
    model = hetero_model()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        out = model(ids, labels=ids, use_cache=False)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)


def test_output_hidden_states_has_one_per_layer_plus_embeddings():
    model = hetero_model()
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == len(HETERO_BLOCKS) + 1
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    # The last layer is a full no-op: its output equals its input.
    assert torch.equal(out.hidden_states[-1], out.hidden_states[-2])


@pytest.mark.parametrize("tied", [False, True])
def test_closed_form_parameter_counts_match_the_module(tied):
    model = hetero_model(tie_word_embeddings=tied, attention_bias=True, qkv_bias=None, mlp_bias=True)
    table = layer_table(model.config)
    for i, layer in enumerate(model.model.layers):
        assert table.loc[i, "params"] == sum(p.numel() for p in layer.parameters())
    assert totals(model.config).params == sum(p.numel() for p in model.parameters())  # tied counted once
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_no_op_sub_blocks_have_no_weights_or_norms():
    names = {k for k in hetero_model().state_dict() if k.startswith(("model.layers.2.", "model.layers.5."))}
    assert names == {"model.layers.2.input_layernorm.weight", "model.layers.2.self_attn.linear_attn.weight"}


def test_bfloat16_forward_is_close_to_float32():
    model = hetero_model()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits.float()
    assert low.dtype == torch.float32 and (low - ref).abs().max() < 0.1 * ref.abs().max()
