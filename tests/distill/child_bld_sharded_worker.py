"""One rank of layer-sharded child-aware BLD in the tests (tests/distill/test_child_bld_sharded.py).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.distill.child_bld_sharded_worker \\
        LIBRARY BLOCKS PARENT CHILD_DIR IDS OUT

``BLOCKS``: the child's architecture (``save_blocks``); ``CHILD_DIR``: it assembled; ``IDS``: a ``torch.save``d
dict of the training ids and the settings. Each rank runs, in ``OUT``:

    library/    the child read from the library's variant files, trained whole
    resumed/    the child read from its assembled directory, stopped after step 3 (every rank), then rerun
    rounds/     the child from the library, one layer a round (rank 0: two rounds), windows of 2 steps
    rounds_resumed/  the same from the assembled directory, stopped after step 3, then rerun
    nan/        a learning rate that blows up: every rank must raise the NumericalError, none may hang

and writes ``OUT/rank{r}.json`` with the summaries, the rerun's tokens and the error each rank raised.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


class Stop(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("library", "blocks", "parent", "child", "ids", "out"):
        ap.add_argument(name)
    args = ap.parse_args()

    from block_library import open_library
    from puzzle.distill.child_bld import ChildBLDConfig
    from puzzle.distill.child_bld_sharded import train_child_sharded
    from puzzle.errors import NumericalError
    from puzzle.schema import load_blocks

    torch.set_num_threads(1)
    data = torch.load(args.ids)
    ids, cfg = data["ids"], ChildBLDConfig(**data["config"])
    blocks = load_blocks(args.blocks)
    lib, out = open_library(args.library), Path(args.out)
    doc: dict = {}
    doc["library"] = train_child_sharded((lib, blocks), args.parent, ids, cfg, out / "library" / "child",
                                         directory=out / "library").summary()

    def stop_after_step_4(step: int) -> None:
        if step == 3:  # 4 steps done, their checkpoint committed on every rank
            raise Stop

    try:
        train_child_sharded(args.child, args.parent, ids, cfg, out / "resumed" / "child", directory=out / "resumed",
                            on_step=stop_after_step_4)
    except Stop:
        doc["stopped"] = True
    doc["resumed"] = train_child_sharded(args.child, args.parent, ids, cfg, out / "resumed" / "child",
                                         directory=out / "resumed").summary()
    window = 2 * cfg.step_batch * cfg.seq_len * lib.parent_config.hidden_size * 4  # two steps' streams
    rounds = dict(max_round_layers=1, window_bytes=window)
    doc["rounds"] = train_child_sharded((lib, blocks), args.parent, ids, cfg, out / "rounds" / "child",
                                        directory=out / "rounds", **rounds).summary()
    try:
        train_child_sharded(args.child, args.parent, ids, cfg, out / "rounds_resumed" / "child",
                            directory=out / "rounds_resumed", on_step=stop_after_step_4, **rounds)
    except Stop:
        doc["rounds_stopped"] = True
    doc["rounds_resumed"] = train_child_sharded(args.child, args.parent, ids, cfg, out / "rounds_resumed" / "child",
                                                directory=out / "rounds_resumed", **rounds).summary()
    try:
        blow_up = ChildBLDConfig(**{**data["config"], "lr": 1e6, "grad_clip": 0.0})
        train_child_sharded(args.child, args.parent, ids, blow_up, out / "nan" / "child", directory=out / "nan")
    except NumericalError as e:
        doc["nan"] = str(e)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps(doc))


if __name__ == "__main__":
    main()
