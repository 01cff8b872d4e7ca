"""The gkd stage's memory ladder: where the whole student does not fit a rank, the plan trains the decoder alone, then
the replaced sub-blocks alone; the first that fits is chosen, its ``how`` says which and why, and the stage's key
and config carry it (only when it is not every weight, so earlier runs keep their keys)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from puzzle.distill.trainable import param_split
from puzzle.errors import ResourceError
from puzzle.schema import AttentionConfig, FFNConfig
from puzzle.search import SearchConfig, resolve
from puzzle.search.resource_plan import plan_resources
from puzzle.search.resources import GIB
from puzzle.search.stages import gkd

FLAGS = dict(gkd_steps=4, gkd_batch=2, eval_sequences=2, quality_context=256)  # benchmarks/scale.py's full run


def _plan(memory: str, model: str = "llama-3.2-1b", cluster: str = "2xcpu"):
    return resolve(SearchConfig(model=model, cluster=cluster, max_memory_per_rank=memory, **FLAGS))


def _proof_child(parent):
    """The child the 1B proof's MIP chose: layers 9-15 replaced (linear attention in 9, 10 and 13, a half FFN in 9,
    the rest no-ops), layers 0-8 the parent's own."""
    blocks = list(parent.blocks)
    for l in range(9, 16):
        blocks[l] = dataclasses.replace(
            blocks[l], attention=AttentionConfig.linear() if l in (9, 10, 13) else AttentionConfig.no_op(),
            ffn=FFNConfig.swiglu(4096) if l == 9 else FFNConfig.no_op())
    return parent.with_blocks(blocks)


def test_the_1b_proof_trains_the_replaced_subblocks_only_and_says_why():
    plan = _plan("6GiB")
    assert gkd.planned_options(plan) == (True, False, "replaced")
    assert plan.resources.fits
    before = plan.resources.stage("gkd")
    assert before.how.endswith("; the replaced sub-blocks only (the MIP's child's, planned with the parent's own "
                               "weights frozen and counted again once it is chosen): the whole student's fp32 state "
                               "does not fit 6.0 GiB per rank, nor the decoder's; 16xcpu fits it")
    assert "FSDP2 over 2 ranks: the student sharded, activation checkpointing" in before.how
    # the parent's 1.24 B weights frozen; each rank reads its half of the cached targets (4.971 when it read all)
    assert before.peak_device_bytes / GIB == pytest.approx(5.126, abs=1e-3)

    child = _proof_child(plan.parent_config)
    split = param_split(child, plan.parent_config, "replaced")
    assert (split.trained, split.frozen) == (37_756_928, 810_063_872)
    after = plan_resources(plan, child=child, search=False).stage("gkd")
    assert "; the replaced sub-blocks only (37.76M of 847.82M parameters trained): the whole student's" in after.how
    # measured on this child, 2 CPU ranks, 2 steps: 4.72 and 4.75 GiB (ratio 1.03; the process alone 0.53-0.58 GiB),
    # the layer-sharded targets before it 3.39 and 4.09 GiB
    assert [r.device_bytes / GIB for r in after.ranks] == pytest.approx([4.61, 4.61], abs=0.01)

    cfg = gkd.STAGE.config(plan)
    assert (cfg.train, cfg.activation_checkpointing, cfg.offload) == ("replaced", True, False)
    assert gkd.STAGE.key(plan, {"fuse": "f"})["train"] == "replaced"
    assert gkd.training_key(plan) == {"gkd": [4, 2, 0, 64], "gkd_train": "replaced"}  # the baselines' keys too


def test_a_larger_rank_trains_the_decoder_and_names_the_cluster_where_every_weight_trains():
    plan = _plan("12GiB")
    assert gkd.planned_options(plan) == (True, False, "decoder")
    how = plan.resources.stage("gkd").how
    assert how.endswith("; the decoder only (973.15M of 1.24B parameters trained, the embedding and LM head frozen): "
                        "the whole student's fp32 state does not fit 12.0 GiB per rank; 4xcpu fits it")
    # 4 ranks (a batch of 4, one sequence a rank, as 2 ranks hold): every weight trains
    four = resolve(SearchConfig(model="llama-3.2-1b", cluster="4xcpu", max_memory_per_rank="12GiB",
                                **{**FLAGS, "gkd_batch": 4}))
    assert gkd.planned_options(four)[2] == "all" and "sub-blocks" not in four.resources.stage("gkd").how


def test_a_rank_that_holds_the_whole_student_trains_every_weight_under_the_old_key():
    plan = _plan("8GiB", model="smollm2-135m")
    assert gkd.planned_options(plan)[2] == "all"
    assert gkd.STAGE.config(plan).train == "all"
    assert "train" not in gkd.STAGE.key(plan, {"fuse": "f"}) and set(gkd.training_key(plan)) == {"gkd"}
    assert "only" not in plan.resources.stage("gkd").how


def test_nothing_fits_is_refused_before_any_work():
    plan = _plan("3GiB")
    assert gkd.planned_options(plan) == (True, False, "replaced")  # the last rung, and it does not fit either
    assert not plan.resources.fits
    assert "stage gkd does not fit 2xcpu: it needs 5.1 GiB of device memory on rank 0, more than the 3.0 GiB per " \
           "rank" in plan.resources.problems


def test_the_stage_checks_the_chosen_child_before_it_trains(tmp_path):
    plan = _plan("6GiB")
    ctx, cfg = SimpleNamespace(plan=plan), gkd.STAGE.config(plan)
    assert gkd.STAGE._fits_child(ctx, cfg, _proof_child(plan.parent_config))
    # the parent's own blocks, some removed: nothing differs from the parent's, nothing to train
    parent = plan.parent_config
    removed = parent.with_blocks([dataclasses.replace(b, ffn=FFNConfig.no_op()) if l % 2 else b
                                  for l, b in enumerate(parent.blocks)])
    assert not gkd.STAGE._fits_child(ctx, cfg, removed)
    # every FFN at half its width: 403 M trained parameters, 6.5 GB of AdamW state and gradients a rank
    halved = parent.with_blocks([dataclasses.replace(b, ffn=FFNConfig.swiglu(4096)) for b in parent.blocks])
    with pytest.raises(ResourceError, match=r"GKD of the chosen child does not fit 2xcpu: the replaced sub-blocks "
                                            r"only \(402\.\d+M of .* parameters trained\) needs \d+\.\d GiB per rank"):
        gkd.STAGE._fits_child(ctx, cfg, halved)


def test_one_process_with_cached_targets_plans_the_cached_logits_beside_the_loaded_parent():
    """One process with ``gkd_top_k``: the training steps read the parent's cached targets (no parent hidden states,
    24 B instead of 32 a logit), and the parent stays loaded for the validation (measured on SmolLM2 at 1024 tokens:
    5.19 GiB against 5.76 planned; 6.20 when the steps were planned with the live parent)."""
    def gkd_bytes(top_k):
        plan = resolve(SearchConfig(model="smollm2-135m", cluster="1xcpu", gkd_top_k=top_k, gkd_batch=1,
                                    quality_context=1024))
        return plan.resources.stage("gkd").peak_device_bytes, plan.parent_config

    live, config = gkd_bytes(0)
    cached, _ = gkd_bytes(64)
    H, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    per_token = (4 * H * (L + 1) + 32 * V) - (4 * H + 24 * V)
    assert live - cached == pytest.approx(1024 * per_token, rel=1e-9)
