"""Closed-form counts per block variant: FLOPs, bytes, all-reduces, parameters, weight and KV bytes.

Every expected number is written out here from the formulas (B batch, T new tokens, L cached
tokens, H hidden, nh / k query / KV heads, hd head width, m FFN width, w bytes per weight, a bytes
per activation), not computed through the helpers under test. Parameter counts are checked
against the real runtime module (``DecoderBlock``), built on the meta device.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from puzzle.model.configuration import PuzzleConfig
from puzzle.model.modeling import DecoderBlock, HeterogeneousForCausalLM
from puzzle.profiler import counts
from puzzle.profiler.counts import ModelShape
from puzzle.profiler.scenario import Scenario
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

SMOL = ModelShape(hidden_size=576, num_attention_heads=9, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
LLAMA8B = ModelShape(hidden_size=4096, num_attention_heads=32, head_dim=128, vocab_size=128256,
                     tie_word_embeddings=False)
W_BYTES = {"bf16": 2, "fp8": 1, "fp32": 4}
A_BYTES = {"bf16": 2, "fp8": 2, "fp32": 4}  # activations and KV stay 16-bit with fp8 weights

ATTENTIONS = [AttentionConfig.gqa(1), AttentionConfig.gqa(3), AttentionConfig.gqa(9), AttentionConfig.linear(),
              AttentionConfig.no_op()]
FFNS = [FFNConfig.swiglu(1536), FFNConfig.swiglu(200), FFNConfig.linear(), FFNConfig.no_op()]


def ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def prefill(batch: int, prompt: int) -> Scenario:
    return Scenario(name="p", phase="prefill", batch=batch, length=prompt)


def decode(batch: int, context: int) -> Scenario:
    return Scenario(name="d", phase="decode", batch=batch, length=context)


def by_name(ops: list[counts.Op]) -> dict[str, counts.Op]:
    names = [op.name for op in ops]
    assert len(names) == len(set(names)), names
    return {op.name: op for op in ops}


def flops_by_name(ops: list[counts.Op]) -> dict[str, float]:
    return {op.name: op.flops for op in ops if op.flops}


# ------------------------------------------------------------------------------------------- FLOPs


SCENARIOS = [prefill(1, 1024), prefill(3, 77), decode(1, 1024), decode(64, 4096), decode(5, 1)]


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: f"{s.phase}-b{s.batch}-n{s.length}")
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_gqa_flops(sc, tp, k):
    B, H, hd = sc.batch, SMOL.hidden_size, SMOL.head_dim
    T = sc.length if sc.phase == "prefill" else 1
    nh_r, k_r = ceil_div(9, tp), ceil_div(k, tp)  # heads on the most loaded rank; KV replicated if k < tp
    if sc.phase == "prefill":
        sdpa = 2 * B * nh_r * T * (T + 1) / 2 * hd * 2  # QK^T and PV over (T + 1) / 2 keys on average
    else:
        sdpa = 2 * B * nh_r * (sc.length + 1) * hd * 2  # one query over the cache plus itself
    expected = {
        "attn.q": 2 * B * T * H * nh_r * hd,
        "attn.k": 2 * B * T * H * k_r * hd,
        "attn.v": 2 * B * T * H * k_r * hd,
        "attn.sdpa": sdpa,
        "attn.o": 2 * B * T * nh_r * hd * H,
    }
    ops = counts.attention_ops(SMOL, AttentionConfig.gqa(k), sc, dtype="bf16", tp=tp)
    assert flops_by_name(ops) == pytest.approx(expected, rel=1e-12)


def test_prefill_sdpa_is_causal():
    # Full (non-causal) attention of T queries over T keys costs 4 B nh T^2 hd; causal is (T + 1) / (2 T) of it.
    T = 2048
    op = by_name(counts.attention_ops(SMOL, AttentionConfig.gqa(3), prefill(1, T), dtype="bf16"))["attn.sdpa"]
    assert op.flops == pytest.approx(4 * 9 * T * T * 64 * (T + 1) / (2 * T))
    assert op.flops < 0.51 * 4 * 9 * T * T * 64


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: f"{s.phase}-b{s.batch}-n{s.length}")
@pytest.mark.parametrize("tp", [1, 3, 8])
def test_linear_and_swiglu_flops(sc, tp):
    H, BT = SMOL.hidden_size, sc.tokens
    att = counts.attention_ops(SMOL, AttentionConfig.linear(), sc, dtype="bf16", tp=tp)
    assert flops_by_name(att) == {"attn.linear": 2 * BT * H * ceil_div(H, tp)}
    ffn = counts.ffn_ops(SMOL, FFNConfig.linear(), sc, dtype="bf16", tp=tp)
    assert flops_by_name(ffn) == {"ffn.linear": 2 * BT * H * ceil_div(H, tp)}
    m_r = ceil_div(1536, tp)
    ffn = counts.ffn_ops(SMOL, FFNConfig.swiglu(1536), sc, dtype="bf16", tp=tp)
    assert flops_by_name(ffn) == {"ffn.gate": 2 * BT * H * m_r, "ffn.up": 2 * BT * H * m_r,
                                  "ffn.down": 2 * BT * m_r * H}


@pytest.mark.parametrize("sc", SCENARIOS[:3], ids=lambda s: f"{s.phase}-b{s.batch}-n{s.length}")
def test_no_op_costs_nothing(sc):
    for tp in (1, 8):
        assert counts.attention_ops(SMOL, AttentionConfig.no_op(), sc, dtype="bf16", tp=tp) == []
        assert counts.ffn_ops(SMOL, FFNConfig.no_op(), sc, dtype="bf16", tp=tp) == []
        block = BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.no_op())
        assert counts.block_ops(SMOL, block, sc, dtype="fp8", tp=tp) == []


def test_tp_splits_that_do_not_divide_round_up():
    # Llama-8B on 3 ranks: 32 heads -> 11, 8 KV heads -> 3, 14336 channels -> 4779 on the busiest rank.
    sc, H, hd = decode(1, 10), 4096, 128
    att = flops_by_name(counts.attention_ops(LLAMA8B, AttentionConfig.gqa(8), sc, dtype="bf16", tp=3))
    assert att["attn.q"] == 2 * H * 11 * hd
    assert att["attn.k"] == 2 * H * 3 * hd
    ffn = flops_by_name(counts.ffn_ops(LLAMA8B, FFNConfig.swiglu(14336), sc, dtype="bf16", tp=3))
    assert ffn["ffn.down"] == 2 * 4779 * H
    # ... and an even split is exactly 1 / tp of the whole.
    whole = sum(flops_by_name(counts.ffn_ops(LLAMA8B, FFNConfig.swiglu(14336), sc, dtype="bf16")).values())
    part = sum(flops_by_name(counts.ffn_ops(LLAMA8B, FFNConfig.swiglu(14336), sc, dtype="bf16", tp=8)).values())
    assert part == whole / 8


# ------------------------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("sc", [prefill(2, 300), decode(4, 1000)], ids=["prefill", "decode"])
def test_gemm_bytes_read_weights_at_w_bytes(dtype, sc):
    w, a, H, hd, k, m = W_BYTES[dtype], A_BYTES[dtype], 576, 64, 3, 1536
    BT = sc.tokens
    block = BlockConfig(attention=AttentionConfig.gqa(k), ffn=FFNConfig.swiglu(m))
    ops = by_name(counts.block_ops(SMOL, block, sc, dtype=dtype))
    # GEMM (rows, K) @ (K, N): weight K N and input rows K at w bytes, output rows N at a bytes.
    shapes = {"attn.q": (H, 9 * hd), "attn.k": (H, k * hd), "attn.v": (H, k * hd), "attn.o": (9 * hd, H),
              "ffn.gate": (H, m), "ffn.up": (H, m), "ffn.down": (m, H)}
    for name, (K, N) in shapes.items():
        assert ops[name].bytes == w * K * N + w * BT * K + a * BT * N, name
        assert ops[name].dtype == dtype
    # Everything that is not a GEMM runs at the activation dtype's rate.
    for name, op in ops.items():
        if name not in shapes:
            assert op.dtype == "bf16", name


def test_decode_weight_bytes_dominate_and_match_the_block_weight_bytes():
    # In a batch-1 decode step the GEMMs read every weight once: w x (weight elements).
    H, hd, k, m = 4096, 128, 8, 14336
    block = BlockConfig(attention=AttentionConfig.gqa(k), ffn=FFNConfig.swiglu(m))
    weights = H * 32 * hd + 2 * H * k * hd + 32 * hd * H + 3 * H * m
    for dtype in ("bf16", "fp8"):
        w = W_BYTES[dtype]
        ops = counts.block_ops(LLAMA8B, block, decode(1, 1), dtype=dtype)
        gemm_bytes = sum(op.bytes for op in ops if op.name.split(".")[1] in ("q", "k", "v", "o", "gate", "up", "down"))
        assert gemm_bytes == pytest.approx(w * weights, rel=2e-3)  # plus one row of activations per GEMM
        # Two norm vectors of H, kept 16-bit.
        assert counts.block_weight_bytes(LLAMA8B, block, dtype=dtype) == w * weights + 2 * 2 * H


@pytest.mark.parametrize("tp", [1, 2, 8])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_decode_reads_the_kv_cache(tp, k):
    B, L, hd, a = 16, 2048, 64, 2
    nh_r, k_r = ceil_div(9, tp), ceil_div(k, tp)
    ops = by_name(counts.attention_ops(SMOL, AttentionConfig.gqa(k), decode(B, L), dtype="bf16", tp=tp))
    # K and V of (B, k_r, L + 1, hd) are read; q is read and the output written, (B, nh_r, hd) each.
    assert ops["attn.sdpa"].bytes == a * (2 * B * (L + 1) * k_r * hd + 2 * B * nh_r * hd)
    # The new token's K and V are written to the cache.
    assert ops["attn.kv_write"].bytes == a * 2 * B * k_r * hd
    # Each extra token of context costs B x the KV bytes per token.
    longer = by_name(counts.attention_ops(SMOL, AttentionConfig.gqa(k), decode(B, L + 100), dtype="bf16", tp=tp))
    per_token = counts.kv_bytes_per_token(SMOL, BlockConfig(attention=AttentionConfig.gqa(k), ffn=FFNConfig.no_op()),
                                          dtype="bf16", tp=tp)
    assert per_token == 2 * k_r * hd * a
    assert longer["attn.sdpa"].bytes - ops["attn.sdpa"].bytes == B * 100 * per_token


def test_prefill_sdpa_bytes():
    B, T, hd, k, a = 2, 512, 64, 3, 2
    op = by_name(counts.attention_ops(SMOL, AttentionConfig.gqa(k), prefill(B, T), dtype="bf16"))["attn.sdpa"]
    assert op.bytes == a * (2 * B * T * 9 * hd + 2 * B * T * k * hd)


@pytest.mark.parametrize("dtype", ["bf16", "fp8", "fp32"])
def test_kv_bytes_per_token(dtype):
    a = A_BYTES[dtype]
    for k in (1, 3, 9):
        block = BlockConfig(attention=AttentionConfig.gqa(k), ffn=FFNConfig.swiglu(1536))
        assert counts.kv_bytes_per_token(SMOL, block, dtype=dtype) == 2 * k * 64 * a
    for att in (AttentionConfig.linear(), AttentionConfig.no_op()):
        assert counts.kv_bytes_per_token(SMOL, BlockConfig(attention=att, ffn=FFNConfig.swiglu(1536)), dtype=dtype) == 0


def test_kv_heads_are_replicated_below_tp():
    gqa1 = BlockConfig(attention=AttentionConfig.gqa(1), ffn=FFNConfig.no_op())
    gqa8 = BlockConfig(attention=AttentionConfig.gqa(8), ffn=FFNConfig.no_op())
    one = counts.kv_bytes_per_token(LLAMA8B, gqa1, dtype="bf16", tp=1)
    assert one == 2 * 1 * 128 * 2
    # gqa:1 on 8 ranks: every rank holds the one KV head, so per-rank KV bytes do not shrink.
    assert counts.kv_bytes_per_token(LLAMA8B, gqa1, dtype="bf16", tp=8) == one
    # gqa:8 on 8 ranks: one head each, 1/8 of the whole.
    assert counts.kv_bytes_per_token(LLAMA8B, gqa8, dtype="bf16", tp=8) == 2 * 8 * 128 * 2 / 8
    # gqa:8 on 16 ranks (more ranks than KV heads): still one head per rank.
    assert counts.kv_bytes_per_token(LLAMA8B, gqa8, dtype="bf16", tp=16) == 2 * 1 * 128 * 2


# ----------------------------------------------------------------------------------- all-reduces


@pytest.mark.parametrize(("att", "ffn"), list(itertools.product(ATTENTIONS, FFNS)),
                         ids=lambda c: c.label)
@pytest.mark.parametrize("tp", [1, 2, 8])
def test_one_allreduce_per_sub_block(att, ffn, tp):
    sc, a = decode(8, 100), 2
    block = BlockConfig(attention=att, ffn=ffn)
    reduces = [op for op in counts.block_ops(SMOL, block, sc, dtype="bf16", tp=tp) if op.allreduce_bytes]
    expected = 0 if tp == 1 else (att.kind != "no_op") + (ffn.kind != "no_op")
    assert len(reduces) == expected
    for op in reduces:  # the (B, T, H) partial sums, 16-bit; a collective moves no memory of its own
        assert op.allreduce_bytes == 8 * 1 * 576 * a
        assert (op.flops, op.bytes, op.kernels) == (0, 0, 0)


def test_prefill_allreduce_payload():
    block = BlockConfig(attention=AttentionConfig.gqa(8), ffn=FFNConfig.swiglu(14336))
    reduces = [op.allreduce_bytes for op in counts.block_ops(LLAMA8B, block, prefill(2, 1024), dtype="fp8", tp=4)
               if op.allreduce_bytes]
    assert reduces == [2 * 1024 * 4096 * 2] * 2


# -------------------------------------------------------------------------------------- fixed ops


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_fixed_ops(tp):
    B, T, H, V, a = 4, 128, 4096, 128256, 2
    ops = by_name(counts.fixed_ops(LLAMA8B, prefill(B, T), dtype="bf16", tp=tp))
    V_r = ceil_div(V, tp)
    # Only the last position of each sequence needs logits.
    assert flops_by_name(list(ops.values())) == {"lm_head": 2 * B * H * V_r}
    assert ops["lm_head"].bytes == 2 * H * V_r + 2 * B * H + a * B * V_r
    if tp == 1:
        assert not any(op.allreduce_bytes for op in ops.values())
    else:
        assert ops["embed.allreduce"].allreduce_bytes == B * T * H * a
        # A ring all-gather of the (B, V) logits costs half an all-reduce of the whole tensor.
        assert ops["lm_head.gather"].allreduce_bytes == B * V_r * tp * a / 2


# ------------------------------------------------------------------------------- parameter counts


def closed_form_params(att: AttentionConfig, ffn: FFNConfig, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
                       H: int = 576, nh: int = 9, hd: int = 64) -> tuple[int, int]:
    if att.kind == "gqa":
        k = att.num_key_value_heads
        attention = H * nh * hd + 2 * H * k * hd + nh * hd * H + H  # q, k, v, o and the input norm
        attention += qkv_bias * (nh + 2 * k) * hd + o_bias * H
    else:
        attention = {"linear": H * H + H, "no_op": 0}[att.kind]
    if ffn.kind == "swiglu":
        m = ffn.intermediate_size
        mlp = 3 * H * m + H + mlp_bias * (2 * m + H)
    else:
        mlp = {"linear": H * H + H, "no_op": 0}[ffn.kind]
    return attention, mlp


BIASES = {  # name: PuzzleConfig bias fields
    "none": dict(attention_bias=False, qkv_bias=None, mlp_bias=False),
    "qkv": dict(attention_bias=False, qkv_bias=True, mlp_bias=False),  # Qwen2
    "all": dict(attention_bias=True, qkv_bias=None, mlp_bias=True),
}


def smol_config(block: BlockConfig, **fields) -> PuzzleConfig:
    return PuzzleConfig(vocab_size=49152, hidden_size=576, num_attention_heads=9, head_dim=64, num_key_value_heads=3,
                        intermediate_size=1536, block_configs=[block.to_dict()], **fields)


def torch_params(module: torch.nn.Module, prefix: tuple[str, ...] = ("",)) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if name.startswith(prefix))


@pytest.mark.parametrize("bias", list(BIASES))
def test_params_match_the_runtime_module(bias):
    fields = BIASES[bias]
    for att, ffn in itertools.product(ATTENTIONS, FFNS):
        block = BlockConfig(attention=att, ffn=ffn)
        config = smol_config(block, **fields)
        shape = ModelShape.from_config(config)
        with torch.device("meta"):
            module = DecoderBlock(config, config.resolved_blocks()[0], cache_slot=0)
        attn_torch = torch_params(module, ("input_layernorm.", "self_attn."))
        ffn_torch = torch_params(module, ("post_attention_layernorm.", "mlp."))
        assert attn_torch + ffn_torch == torch_params(module)
        expected = closed_form_params(att, ffn, qkv_bias=bool(fields["qkv_bias"] or fields["attention_bias"]),
                                      o_bias=fields["attention_bias"], mlp_bias=fields["mlp_bias"])
        assert (attn_torch, ffn_torch) == expected, block.label
        # counts re-exports puzzle.summary's counts, which read a PuzzleConfig or a ModelShape.
        assert counts.attention_params(att, shape) == counts.attention_params(att, config) == attn_torch, block.label
        assert counts.ffn_params(ffn, shape) == counts.ffn_params(ffn, config) == ffn_torch, block.label
        assert counts.block_params(shape, block) == torch_params(module), block.label


def test_llama8b_block_params():
    block = BlockConfig(attention=AttentionConfig.gqa(8), ffn=FFNConfig.swiglu(14336))
    config = PuzzleConfig(vocab_size=128256, hidden_size=4096, num_attention_heads=32, head_dim=128,
                          num_key_value_heads=8, intermediate_size=14336, block_configs=[block.to_dict()])
    with torch.device("meta"):
        module = DecoderBlock(config, config.resolved_blocks()[0], cache_slot=0)
    assert counts.block_params(LLAMA8B, block) == torch_params(module) == 218_112_000


@pytest.mark.parametrize("tied", [True, False])
def test_fixed_params_tied_and_untied(tied):
    block = BlockConfig(attention=AttentionConfig.gqa(3), ffn=FFNConfig.swiglu(1536))
    config = smol_config(block, tie_word_embeddings=tied)
    shape = ModelShape.from_config(config)
    assert shape.tie_word_embeddings is tied
    with torch.device("meta"):
        model = HeterogeneousForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    assert counts.fixed_params(shape) == total - counts.block_params(shape, block)
    assert counts.fixed_params(shape) == 49152 * 576 * (1 if tied else 2) + 576


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_fixed_weight_bytes(tp):
    V_r, H = ceil_div(128256, tp), 4096
    untied = LLAMA8B
    tied = ModelShape(hidden_size=4096, num_attention_heads=32, head_dim=128, vocab_size=128256)
    for dtype in ("bf16", "fp8"):
        w = W_BYTES[dtype]
        # Embedding rows and the final norm stay 16-bit; an untied head is a GEMM weight at w bytes.
        assert counts.fixed_weight_bytes(untied, dtype=dtype, tp=tp) == 2 * V_r * H + w * V_r * H + 2 * H
        assert counts.fixed_weight_bytes(tied, dtype=dtype, tp=tp) == 2 * V_r * H + 2 * H


# ---------------------------------------------------------------------------------- weight bytes


@pytest.mark.parametrize(("att", "ffn"), list(itertools.product(ATTENTIONS, FFNS)), ids=lambda c: c.label)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_block_weight_bytes_per_rank(att, ffn, tp, dtype):
    w, a, H, hd = W_BYTES[dtype], 2, 576, 64
    nh_r = ceil_div(9, tp)
    expected = 0
    if att.kind == "gqa":
        k_r = ceil_div(att.num_key_value_heads, tp)
        expected += w * (H * nh_r * hd + 2 * H * k_r * hd + nh_r * hd * H) + a * H
    elif att.kind == "linear":
        expected += w * H * ceil_div(H, tp) + a * H
    if ffn.kind == "swiglu":
        expected += w * 3 * H * ceil_div(ffn.intermediate_size, tp) + a * H
    elif ffn.kind == "linear":
        expected += w * H * ceil_div(H, tp) + a * H
    block = BlockConfig(attention=att, ffn=ffn)
    assert counts.block_weight_bytes(SMOL, block, dtype=dtype, tp=tp) == expected
    if tp == 1 and dtype == "bf16":  # every parameter at 2 bytes
        assert expected == 2 * counts.block_params(SMOL, block)


def test_model_shape_from_config():
    config = PuzzleConfig(vocab_size=1000, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=96, num_hidden_layers=1, tie_word_embeddings=True, qkv_bias=True)
    shape = ModelShape.from_config(config)
    assert shape == ModelShape(hidden_size=64, num_attention_heads=4, head_dim=16, vocab_size=1000,
                               tie_word_embeddings=True, qkv_bias=True, attention_bias=False, mlp_bias=False)
    # qkv_bias unset follows attention_bias (Llama semantics).
    config = PuzzleConfig(vocab_size=1000, hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                          attention_bias=True)
    assert ModelShape.from_config(config).qkv_bias is True
