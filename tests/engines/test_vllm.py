"""A searched child of the real SmolLM2-135M inside vLLM: it loads, and its greedy tokens and top log-probs
are this project's runtime's (skipped when vLLM is not installed; CI installs it: see the README).

The child is assembled from the BLD-trained library of the default search space under ``--engine vllm``
(the variants the MIP may pick there): no-op attention, narrowed FFNs, a no-op FFN, one KV head where
the parent has 3, and two attention-free layers fused into one FFN of twice the width.
"""

from __future__ import annotations

import pytest
import torch

from puzzle.engines import vllm as engine

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not engine.available(), reason=f"vLLM is not installed: {engine.INSTALL}")]

PROMPTS = ["def fibonacci(n):\n    ", "import os\nimport sys\n\n\ndef main(", "class Stack:\n    def push(self, item):"]


@pytest.fixture(scope="module")
def child_dir(smollm2_trained_library, smollm2_source, tmp_path_factory):
    from puzzle.engines import check_loadable, engine_rules
    from puzzle.export import export_decilm
    from puzzle.fusion.fuse import fuse_model
    from puzzle.fusion.runs import Segment
    from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig

    lib = smollm2_trained_library
    blocks = list(lib.parent_config.blocks)
    def put(i, attention=None, ffn=None):  # noqa: E306
        blocks[i] = BlockConfig(attention=attention or blocks[i].attention, ffn=ffn or blocks[i].ffn)
    put(3, attention=AttentionConfig.gqa(1))
    put(7, ffn=FFNConfig.swiglu(768))
    put(12, ffn=FFNConfig.swiglu(256))
    put(16, attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(1024))
    put(17, attention=AttentionConfig.no_op())
    put(20, ffn=FFNConfig.no_op())
    put(26, attention=AttentionConfig.no_op())
    for i, b in enumerate(blocks):  # every one a variant the vLLM search space offers at its layer
        assert b.attention.label in lib.labels(i, "attention") and b.ffn.label in lib.labels(i, "ffn")
    child = fuse_model(lib.assemble(blocks), [Segment(16, 18)])  # -> no_op|swiglu:2560 at layer 16
    assert child.config.blocks[16].ffn.intermediate_size == 2560 and child.config.num_hidden_layers == 29
    check_loadable(engine_rules("vllm"), child.config.blocks, child.config)
    out = tmp_path_factory.mktemp("vllm_child") / "model"
    export_decilm(child, out, source_dir=smollm2_source.directory)
    return out


@pytest.fixture(scope="module")
def child_llm(child_dir):
    llm = engine.load(child_dir, max_model_len=256)
    yield llm
    engine.close(llm)


def assert_vllm_matches_runtime(model_dir, llm=None) -> None:
    """vLLM loads ``model_dir`` (or ``llm`` has); its greedy tokens are ours and its top-5 log-probs within 2e-3."""
    from puzzle.loading import load_model, load_tokenizer

    child, tok = load_model(model_dir), load_tokenizer(model_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    own = llm is None
    llm = engine.load(model_dir, max_model_len=256) if own else llm
    try:
        outs = engine.greedy(llm, prompts, max_tokens=16, logprobs=5)
    finally:
        if own:
            engine.close(llm)
    for ids, out in zip(prompts, outs):
        seq = torch.tensor([ids + out.tokens])
        with torch.no_grad():
            logp = torch.log_softmax(child(seq, use_cache=False).logits[0].double(), dim=-1)  # (T, V)
        steps = logp[len(ids) - 1:-1]  # the distributions the 16 new tokens were drawn from
        assert steps.argmax(-1).tolist() == out.tokens  # the same greedy continuation
        for k, top in enumerate(out.top):
            ours = steps[k].topk(5)
            assert set(top) >= set(ours.indices.tolist())  # the same top-5 tokens (vLLM adds the chosen one)
            for t, lp in top.items():
                assert abs(steps[k, t].item() - lp) < 2e-3, (k, t)


def test_vllm_loads_a_library_child_and_matches_our_runtime(child_dir, child_llm):
    assert_vllm_matches_runtime(child_dir, child_llm)


def test_the_readme_commands_child_loads_in_vllm_and_matches_our_runtime(tmp_path):
    """`puzzle search --budget 8xH100` (the README's first command: SmolLM2, --engine vllm by default), its
    stages shrunk to minutes: the child it exports is one vLLM loads."""
    import puzzle
    from puzzle.loading import load_config
    from puzzle.search import SearchConfig

    tiny = dict(bld_tokens=512, bld_eval_sequences=1, score_sequences=1, score_seq_len=16, finalists=2, child_bld_tokens=512,
                fuse_sequences=1,
                fuse_distill_steps=0, gkd_steps=0, eval_sequences=1, measure_speed=False)  # GKD keeps the architecture
    run = puzzle.search(SearchConfig(budget="8xH100", **tiny), run_dir=tmp_path / "run", progress=False)
    assert run.plan.engine == "vllm" and "vllm" in run.report.set_index("model").loc["child", "engines"].split()
    blocks = load_config(run.export_dir).blocks
    assert any(b.attention.kind == "no_op" or b.ffn.kind != "swiglu" or b.ffn.intermediate_size < 1536 for b in blocks)
    assert_vllm_matches_runtime(run.export_dir)


def test_parent_and_child_timed_inside_vllm_beside_the_prediction(child_dir, child_llm, smollm2_source):
    """What `puzzle evaluate --engine vllm` and a `--budget cpu` search's evaluate stage run (the CLI's own plumbing
    is tested without vLLM in test_rules.py)."""
    from puzzle.evaluation.engine_speed import engine_speed, present_target
    from solvers import Scenario

    parent = engine.load(smollm2_source.directory, max_model_len=256)
    try:
        table = engine_speed(child_dir, smollm2_source.directory, [Scenario(name="decode", phase="decode", batch=2,
                             length=64)], target=present_target(), rounds=2, loaded={"parent": parent, "child": child_llm})
    finally:
        engine.close(parent)
    row = table.iloc[0]
    assert list(table.scenario) == ["decode"] and row.parent_ms > 0 and row.child_ms > 0
    assert 1.0 < row.predicted_speedup < 2.0  # a 29-layer child with fewer FFN channels and 3 attentions fewer
    assert 0.5 < row.engine_speedup < 4.0  # measured: a real ratio, not a division by an empty timing


def test_a_step_is_read_from_the_engines_own_timestamps(child_llm):
    """Decode steps are timed within one call (first to last token), so the prompt's cost never enters them: more
    decode tokens give about the same step time, and a prefill of the same prompts takes longer than a step."""
    from solvers import Scenario

    decode = Scenario(name="decode", phase="decode", batch=2, length=128)
    prefill = Scenario(name="prefill", phase="prefill", batch=2, length=128)
    engine.step_ms(child_llm, decode, decode_tokens=2)  # warm-up
    few, many = engine.step_ms(child_llm, decode, decode_tokens=4), engine.step_ms(child_llm, decode, decode_tokens=24)
    assert 0 < few < 2000 and 0 < many < 2000 and 1 / 3 < many / few < 3, (few, many)
    assert engine.step_ms(child_llm, prefill) > few  # 256 prompt tokens at once against 2 new ones
