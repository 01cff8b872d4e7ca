"""How data/plans_before_stage_objects.json was made: run against a checkout of commit fc47926 (before the stage move),
    PYTHONPATH=/path/to/fc47926 python tests/search/data/make_plans_before_stage_objects.py OUT.json
then written without indentation. The test beside it recomputes the same with the current code."""
import dataclasses, json, sys
import torch
from puzzle.profiler import cpu
PEAKS = {"fp32_flops": 1e11, "bandwidth": 2e10, "kernel_overhead_us": 3.0, "threads": 1, "cpu": "fake",
         "torch": torch.__version__}
cpu._MEMO.clear()
cpu.cpu_peaks = lambda **kw: dict(PEAKS)
cpu.fp32_flops = lambda: 1e11
cpu.total_ram_gb = lambda: 24.0
from puzzle.search import SearchConfig, resolve
from puzzle.search.pipeline import STAGES, stage_key
from puzzle.search.plan import plan_space
from puzzle.search.resources import Work, plan_resources
from puzzle.schema import AttentionConfig, FFNConfig

CASES = {
    "smollm2-quick": {},
    "smollm2-full": {"preset": "full"},
    "smollm2-quick-options": {"baselines": ["uniform_ffn", "shortgpt"], "ffn_refit": True, "child_refit": True,
                              "refine_rounds": 2, "finalists": 3, "constraints": ["layer[0] == parent"],
                              "speedup": 1.8, "memory": 50.0, "seed": 3},
    "smollm2-cpu-2ranks": {"budget": "cpu", "cluster": "2xcpu", "max_memory_per_rank": "6GiB"},
    "smollm2-fuse-gpu": {"fuse_threshold": 0.3, "gkd_top_k": 0, "finalists": 1, "child_bld_tokens": 0},
    "llama-3.1-70b-8xH100-quick": {"model": "llama-3.1-70b", "cluster": "8xH100"},
    "llama-3.1-70b-8xH100-full": {"model": "llama-3.1-70b", "cluster": "8xH100", "preset": "full"},
    "llama-3.2-1b-2xcpu": {"model": "llama-3.2-1b", "cluster": "2xcpu", "max_memory_per_rank": "10GiB", "budget": "cpu"},
}


def child_of(parent):
    blocks = []
    for i, b in enumerate(parent.blocks):
        ffn = b.ffn
        if i % 2 == 1 and b.ffn.kind == "swiglu":
            ffn = FFNConfig.swiglu(b.ffn.intermediate_size // 2)
        att = AttentionConfig.no_op() if i in (3, 5) else b.attention
        blocks.append(dataclasses.replace(b, attention=att, ffn=ffn))
    return parent.with_blocks(blocks)


def case(overrides):
    plan = resolve(SearchConfig.from_dict(overrides))
    up = {s: f"sha-{s}" for s in STAGES}
    keys = {s: stage_key(plan, s, up, "fingerprint") for s in STAGES + ("baselines",)}
    child = child_of(plan.parent_config)
    work = dataclasses.replace(Work.from_plan(plan), child=child)
    child_res = plan_resources(plan.parent_config, work, plan.cluster, space=plan_space(plan), search=False)
    return {"config": overrides, "settings": plan.to_dict()["settings"],
            "keys": json.loads(json.dumps(keys, default=str)),
            "resources": plan.resources.to_dict(), "child_resources": child_res.to_dict()}


out = {name: case(o) for name, o in CASES.items()}
json.dump(out, open(sys.argv[1], "w"), indent=1, default=str)
print("ok", len(out))
