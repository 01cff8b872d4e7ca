"""One rank of the layer-sharded finalists in the tests: the measurement itself and the solve stage, on a search
whose library, BLD, scores and costs another process made.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.search.finalists_sharded_worker ARGS.json

``ARGS.json``: ``config`` (the search's, for a cluster of this many ranks), ``run`` (its directory), ``results``
(a pickle of its StageResults: score, profile, bld), ``out``. Each rank writes ``out/rank{r}.json``:

* ``direct``: :func:`measure_finalists_sharded` of the MIP's 4 best different children on the first 2 held-out
  sequences' first 64 tokens against the parent's whole vocabulary (k = V: the exact KL), best first;
* ``stage``: what the solve stage's run returned on this rank (rank 0 wrote solve/ under ``out``);
* ``error``: the message of the DataError a function raised on rank 0 inside :func:`from_first`.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

from puzzle.errors import DataError


def _no_data() -> None:
    raise DataError("the validation split has no sequences")


def main() -> None:
    from block_library import open_library
    from block_library.session import parent_fingerprint
    from puzzle.search import SearchConfig, resolve
    from puzzle.search.context import StageContext
    from puzzle.search.finalists import finalist_ids
    from puzzle.search.finalists_sharded import from_first, measure_finalists_sharded, rank_shard
    from puzzle.search.ranks import join
    from puzzle.search.stages.solve import STAGE, SolveSettings, finalist_plan, solve_problem
    from solvers.diverse import diverse_solutions

    args = json.loads(Path(sys.argv[1]).read_text())
    out = Path(args["out"])
    group = join()
    plan = resolve(SearchConfig(**args["config"]))
    ctx = StageContext(plan, Path(args["run"]), False, group=group)
    ctx.results.update(pickle.loads(Path(args["results"]).read_bytes()))
    shard, s = rank_shard(group), SolveSettings.of(plan)

    solutions = from_first(shard, lambda: diverse_solutions(solve_problem(ctx), 4, min_fraction=0.1))
    skip, sequences, T = finalist_plan(plan)  # the solve stage's held-out tokens
    ids = from_first(shard, lambda: finalist_ids(s.data, ctx.tokenizer, skip=skip, sequences=sequences,
                                                 seq_len=T))[:2, :64]
    vocab = plan.parent_config.vocab_size
    direct = measure_finalists_sharded(open_library(ctx.out("bld", "library")), ctx.source, solutions, ids,
                                       shard=shard, path=out / "direct" / "parent-all.safetensors",
                                       parent_sha256=parent_fingerprint(ctx.source), top_k=vocab)
    try:  # an error on rank 0 reaches every rank, as the error it is
        from_first(shard, _no_data)
        error = None
    except DataError as e:
        error = str(e)
    group.barrier()
    (out / "solve").mkdir(parents=True, exist_ok=True)
    returned = STAGE.run(ctx, out / "solve")
    group.barrier()
    doc = {"direct": [{"mip_rank": f.mip_rank, "blocks": " ".join(f.solution.layer_labels()), **f.quality}
                      for f in direct], "stage": returned, "error": error}
    (out / f"rank{group.rank}.json").write_text(json.dumps(doc, default=str))


if __name__ == "__main__":
    main()
