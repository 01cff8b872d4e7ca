"""The child_bld stage's plan: each rank's layers in rounds that fit its memory (8B and 70B parents on 8xH100 with
the full and production presets, 8B in one process on one H100, the 1B-shaped proof on 2 CPU ranks of 6 GiB), the
refit's tokens capped, and times that count every window's reloads."""

from __future__ import annotations

import re

import pytest

from puzzle.search import SearchConfig, resolve

GIB = 2**30


def _plan(**settings):
    plan = resolve(SearchConfig(**settings))
    return plan, plan.resources.stage("child_bld")


@pytest.mark.parametrize("model, preset, rounds", [("llama-3.1-70b", "full", 3), ("llama-3.1-70b", "production", 3),
                                                   ("llama-3.1-8b", "full", 1), ("llama-3.1-8b", "production", 1)])
def test_child_bld_fits_every_rank_of_8xh100(model, preset, rounds):
    """70B's ten layers a rank (175 GiB whole, before the MIP every sub-block counted as trained) go in 3 rounds;
    8B's four a rank fit in one, the code path without rounds."""
    plan, use = _plan(model=model, cluster="8xH100", preset=preset)
    print(f"{model} {preset}: {use.peak_device_bytes / GIB:.2f} GiB, {use.rounds} rounds, {use.seconds / 3600:.2f} h; "
          f"{use.how}")
    assert use.fits, plan.resources.problem
    assert all(r.device_bytes <= plan.cluster.memory_per_rank for r in use.ranks)
    assert use.rounds == rounds and [r.rounds for r in use.ranks] == [rounds] * 8
    assert ("rounds of its layers" in use.how) == (rounds > 1)
    assert all(s.peak_device_bytes <= plan.cluster.memory_per_rank for s in plan.resources.stages), \
        {s.stage: s.peak_device_bytes / GIB for s in plan.resources.stages}


def test_70b_production_windows_stay_bounded_and_its_time_counts_the_reloads():
    """250 M training tokens (244 k steps of 4 x 256): a window's streams fill at most a quarter of a rank's host
    memory, every window rereads each round's parent and child layers and checkpoint and writes it again, and the
    refit reads its 262,144 tokens only (the same device peak as the full preset's 131,072, give or take the
    streams)."""
    from puzzle.search.stages.child_bld import ChildBLDSettings, training_config

    plan, use = _plan(model="llama-3.1-70b", cluster="8xH100", preset="production")
    full = _plan(model="llama-3.1-70b", cluster="8xH100", preset="full")[1]
    cfg = training_config(ChildBLDSettings.of(plan))
    window = int(re.search(r"windows of (\d+) steps", use.how).group(1))
    H = plan.parent_config.hidden_size
    assert window * cfg.step_batch * cfg.seq_len * H * 4 <= 0.25 * plan.cluster.host_per_rank
    assert window >= 1000 and use.peak_host_bytes <= plan.cluster.host_per_rank
    # rank 7: 10 layers, every sub-block trained (an upper bound): 8 FLOPs a token a parameter (parent forward,
    # child forward and backward), and a window's reads and writes (parent, child, checkpoint twice: 32 B a param)
    params = sum(plan.parent_config.blocks[l].ffn.intermediate_size * 3 * H for l in range(70, 80))
    params += 10 * (2 * H * H + 2 * H * plan.parent_config.num_key_value_heads * plan.parent_config.head_dim)
    compute = cfg.steps * cfg.step_batch * cfg.seq_len * 8 * params / plan.cluster.flops_per_rank
    reloads = -(-cfg.steps // window) * 32 * params / 1e9
    print(f"70B production: {use.seconds / 3600:.1f} h; compute {compute / 3600:.1f} h, reloads {reloads / 3600:.1f} h")
    assert compute + reloads <= use.ranks[7].seconds <= 1.3 * (compute + reloads)
    assert use.peak_device_bytes == pytest.approx(full.peak_device_bytes, rel=0.05)


def test_8b_trains_in_one_process_on_one_h100_in_rounds():
    """One process (the stage runs the layer-sharded path on one rank): 8B's 32 layers in rounds under 67 GiB."""
    plan, use = _plan(model="llama-3.1-8b", cluster="1xH100", preset="full")
    print(f"8B on 1xH100: {use.peak_device_bytes / GIB:.2f} GiB, {use.rounds} rounds; {use.how}")
    assert use.fits and use.rounds > 1 and use.how.startswith("one process")


def test_the_1b_proof_fits_two_cpu_ranks_of_6_gib():
    """benchmarks/scale.py's 1B-shaped search with child-aware BLD on 2,048 tokens and the refit: 13.5 GiB on rank
    0 with each rank's 8 layers held together; in rounds under its 6 GiB."""
    from benchmarks.scale import SPACE

    plan, use = _plan(model="llama-3.2-1b", cluster="2xcpu", max_memory_per_rank="6GiB", budget="8xH100",
                      fuse_threshold=0.0, measure_speed=False, bld_tokens=2048, bld_eval_sequences=4,
                      score_sequences=1, score_seq_len=64, eval_sequences=2, gkd_steps=0, space=SPACE,
                      engine="transformers", child_bld_tokens=2048, child_refit=True,
                      quality_context=256)  # as measured
    print(f"1B at 6 GiB: {use.peak_device_bytes / GIB:.2f} GiB, {use.rounds} rounds; {use.how}")
    assert use.fits and use.rounds > 1 and use.peak_device_bytes <= 6 * GIB
    assert plan.resources.fits, plan.resources.problem


def test_rank_0_holds_one_embedding_when_the_childs_is_the_parents():
    """With drift the refit needs the parent's stream: a library child's embedding is the parent's, so rank 0 holds
    it once (one round and its refit whole: one embedding less; a refit by layer: one less beside its streams)."""
    from puzzle.distill.child_bld_memory import FP32, LayerShape, RefitShape, plan_rank

    shape = LayerShape(parent=[1000] * 4, child=[800] * 4, trained=[300] * 4, width=[32] * 4, hidden=16, heads=2,
                       embedding=50_000)
    refit = dict(tokens=256, last=3, drift=True, select=True, chunk_tokens=64)
    two, one = (plan_rank(shape, range(0, 4), batch=2, seq_len=8, window=4, first=True, cpu=True,
                          refit=RefitShape(**refit, shared_embedding=shared)) for shared in (False, True))
    assert two.refit_whole and one.refit_whole
    assert two.refit_bytes - one.refit_bytes == FP32 * shape.embedding  # 200,000 bytes
    assert two.round_bytes[0] - one.round_bytes[0] == FP32 * shape.embedding  # kept with the models after the refit
    apart = [plan_rank(shape, range(0, 4), batch=2, seq_len=8, window=4, first=True, cpu=True, budget=b,
                       refit=RefitShape(**refit, shared_embedding=s)) for s, b in ((False, 250_000), (True, 250_000))]
    assert not apart[0].refit_whole and apart[0].refit_bytes - apart[1].refit_bytes == FP32 * shape.embedding
    # the stage's child is the library's: 8B on 8xH100 (one round, the refit whole) counts one embedding on rank 0
    plan, use = _plan(model="llama-3.1-8b", cluster="8xH100", preset="full")
    config = plan.parent_config
    assert use.ranks[0].device_bytes - use.ranks[1].device_bytes < 1.05 * FP32 * config.vocab_size * config.hidden_size


def test_405b_fits_64xh100_with_the_refits_gram_in_host_ram():
    """405B's FFN width 53,248: one layer's float64 G, C and the elimination's matrices are 124 GiB, more than an H100.
    On 64xH100 (two layers a rank, in two rounds) the refit keeps them in host RAM, rank 0 holds one embedding and
    embeds in host RAM (its first layer and AdamW state alone take 62 GiB), and every stage fits."""
    plan, use = _plan(model="llama-3.1-405b", cluster="64xH100", preset="full",
                      quality_context=256)  # at 1024 GKD's cached targets (13 M tokens) outgrow the host
    print(f"405B full on 64xH100: {use.peak_device_bytes / GIB:.2f} GiB device, {use.peak_host_bytes / GIB:.1f} GiB "
          f"host, {use.seconds / 3600:.1f} h; {use.how}")
    assert use.fits and plan.resources.fits, plan.resources.problem
    assert all(r.device_bytes <= plan.cluster.memory_per_rank for r in use.ranks)
    assert "the refit's Gram and elimination in host RAM" in use.how and "rank 0 embeds in host RAM" in use.how
    D, H = 53248, plan.parent_config.hidden_size
    gram = (D * D + D * H) * 8  # G and C, float64
    assert 4 * gram <= use.peak_host_bytes <= plan.cluster.host_per_rank  # and the elimination's, on the host
    assert all(s.peak_device_bytes <= plan.cluster.memory_per_rank for s in plan.resources.stages)
    # the elimination's 2 D^3 flops a layer, rank after rank, run at a GPU node's host rate: they dominate the stage
    from puzzle.search.cluster import HOST_FP64_FLOPS_PER_GPU

    elimination = 126 * 2 * D ** 3 / HOST_FP64_FLOPS_PER_GPU
    assert elimination < use.seconds < 2 * elimination  # and the chunks' Gram copies to the host


def test_a_fused_childs_plan_counts_child_bld_as_before_the_fusion():
    """After fusion the child has fewer layers than the parent; the later stages' plans (resources.csv) still
    count child_bld, which ran on the MIP's child, as its upper bound: the parent's layers."""
    from puzzle.search.resource_plan import plan_resources

    plan = resolve(SearchConfig(model="llama-3.2-1b", cluster="2xcpu", max_memory_per_rank="6GiB"))
    fused = plan.parent_config.with_blocks(plan.parent_config.blocks[:-2])  # two layers fewer
    before = plan.resources.stage("child_bld")
    after = plan_resources(plan, child=fused, search=False).stage("child_bld")
    assert after.peak_device_bytes == before.peak_device_bytes and after.rounds == before.rounds


def test_a_child_with_nothing_to_train_is_planned_as_its_assembly():
    """The MIP's child keeps the parent's own sub-blocks and no-ops only (the README command's at 1024 tokens: 14
    attentions kept, every FFN whole): the stage writes it tensor by tensor and plans that (it planned 0 bytes; measured
    in one process 0.72 GiB against 0.63 planned), not the training it does not run."""
    import dataclasses

    from puzzle.export.memory import assembly_peak_bytes
    from puzzle.schema import AttentionConfig
    from puzzle.search.resource_plan import plan_resources

    plan, _ = _plan(model="smollm2-135m")
    parent = plan.parent_config
    child = parent.with_blocks([dataclasses.replace(b, attention=AttentionConfig.no_op()) if i % 2 else b
                                for i, b in enumerate(parent.blocks)])
    use = plan_resources(plan, child=child, search=False).stage("child_bld")
    assert use.how == "rank 0: the child assembled tensor by tensor (it replaces no sub-block: nothing to train)"
    assert [r.device_bytes for r in use.ranks] == [assembly_peak_bytes(child)] and use.ranks[0].device_bytes > 0.5 * GIB
    trained = parent.with_blocks([dataclasses.replace(b, attention=AttentionConfig.gqa(1)) if i == 3 else b
                                  for i, b in enumerate(child.blocks)])  # one attention of another shape: trained
    assert "one process: the replaced sub-blocks trained" in plan_resources(plan, child=trained,
                                                                          search=False).stage("child_bld").how


def test_a_stage_that_reads_its_own_layers_frees_the_whole_parent_first(tmp_path):
    """One process keeps the parent an earlier stage loaded (the finalists'); the pipeline drops it before every
    stage that does not read it whole (child_bld reads its own layers; export and the library's stages read files),
    so that stage's measured peak is its own (SmolLM2 at 1024 tokens: child_bld measured 1.18 GiB against 0.79
    planned with the finalists' 0.5 GiB parent still held), and the next stage that needs it loads it again."""
    from puzzle.search import REGISTRY
    from puzzle.search.context import StageContext

    whole = {s.name for s in REGISTRY.all() if s.whole_parent}
    assert whole == {"solve", "fuse", "gkd", "evaluate", "baselines"}
    plan, _ = _plan(model="smollm2-135m")
    ctx = StageContext(plan, tmp_path, False)
    ctx._parent = held = object()  # what the finalists loaded
    assert ctx.parent is held
    ctx.drop_parent()
    assert ctx._parent is None
