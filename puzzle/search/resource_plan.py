"""The resource plan: every stage's memory, disk and time on every rank, before any work is done.

    plan_resources(plan)                         # on the plan's cluster; the smallest that fits when it does not
    plan_resources(plan, child=chosen_config)    # again, for the child the MIP chose (what a run records)

Each stage's model is its own (``Stage.resources`` in ``puzzle/search/stages/<name>.py``); this runs
them in order over the parent's layer sizes. How the built-in stages use ``W`` ranks:

=========  ==============================================================================
library    layers split over ranks (as BLD); each rank's variants initialized in rounds
bld        the same split; the rank's variants trained in rounds that fit its memory, each
           round replaying the teacher pass (:mod:`block_library.rounds`)
score      the same split; replacements stream through the ranks holding the later layers
profile    rank 0 (the cost table, and on the CPU timing a few blocks)
solve      rank 0 (the MIP; the finalists and the refinement in one process)
child_bld  rank 0: parent and child whole (one process), or the child assembled tensor by tensor
fuse       layers split over ranks (one process: parent, child and fused child whole)
gkd        FSDP2: student (fp32 master, grads, AdamW: 16 B/param) and teacher sharded W ways,
           one layer unsharded at a time; the optimizer state moves to host RAM when the
           device cannot hold it
export     rank 0, the child copied tensor by tensor into DeciLM files
evaluate   layers split over ranks, the parent's then the child's (one process: both whole)
=========  ==============================================================================
"""

from __future__ import annotations

from typing import Any

from puzzle.search.plan import Plan, plan_space
from puzzle.search.resources import CLUSTER_SIZES, GIB, ResourcePlan, Shapes, StageUse
from puzzle.search.stages import REGISTRY


def plan_resources(plan: Plan, cluster: Any = None, *, child: Any = None, search: bool = True) -> ResourcePlan:
    """Every stage's use of ``cluster`` (default: the plan's); when one does not fit, the smallest cluster that
    does (``search``). ``child``: the chosen child's config (default: planned as large as the parent)."""
    from block_library.memory import layer_sizes

    cluster = cluster if cluster is not None else plan.cluster
    shapes = Shapes(plan.parent_config, tuple(layer_sizes(plan.parent_config, plan_space(plan))), child)
    return _plan(plan, cluster, shapes, search=search)


def _plan(plan: Plan, cluster: Any, shapes: Shapes, *, search: bool) -> ResourcePlan:
    uses = (stage.resources(plan, cluster, shapes) for stage in REGISTRY.of(plan))
    stages = tuple(u for u in uses if u is not None)
    problems = tuple(_problem(s, cluster) for s in stages if not s.fits)
    smallest = None
    if problems and search:
        for n in CLUSTER_SIZES:
            if n <= cluster.count or n > len(shapes.layers):
                continue
            if _plan(plan, cluster.with_count(n), shapes, search=False).fits:
                smallest = cluster.with_count(n).name
                break
    return ResourcePlan(cluster=cluster, stages=stages, smallest=smallest, problems=problems)


def _problem(s: StageUse, cluster: Any) -> str:
    worst = max(s.ranks, key=lambda r: r.device_bytes / s.limit_bytes)
    if s.peak_device_bytes > s.limit_bytes:
        what = f"{worst.device_bytes / GIB:.1f} GiB of device memory on rank {worst.rank}"
        limit = f"{s.limit_bytes / GIB:.1f} GiB per rank"
    else:
        worst = max(s.ranks, key=lambda r: r.host_bytes)
        what = f"{worst.host_bytes / GIB:.1f} GiB of host memory on rank {worst.rank}"
        limit = f"{s.host_limit_bytes / GIB:.1f} GiB per rank"
    extra = f" ({s.note})" if s.note else ""
    return f"stage {s.stage} does not fit {cluster.name}: it needs {what}, more than the {limit}{extra}"
