"""One rank of the sharded evaluation in the tests, and random model directories for them.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.evaluation.sharded_worker \\
        CHILD PARENT OUT --seq-len 32 --num-sequences 5 --chunk 2 [--alone] [--other-child DIR]

Each rank writes ``OUT/rank{r}.json``: the metrics it returned, its layers, and its peak RSS during the
evaluation (:mod:`puzzle.peak`, reset just before).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from puzzle.model import PuzzleConfig


def write_random_model(directory: Path, config: PuzzleConfig, *, seed: int, std: float = 0.05,
                       tokenizer_dir: Path | None = None) -> Path:
    """A runtime directory of ``config`` with random weights, written one tensor at a time (norms
    1 + N(0, 0.1)): model directories of any size without holding one in memory."""
    from puzzle.io import atomic_write_json, copy_tokenizer_files, save_safetensors_streamed
    from puzzle.model.weights import meta_model, runtime_weight_names

    model = meta_model(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    specs = {k: (shapes[k], torch.float32) for k in runtime_weight_names(model)}

    def read(name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 100_003 + sorted(specs).index(name))
        t = torch.randn(specs[name][0], generator=g)
        return 1 + 0.1 * t if "norm" in name else std * t

    directory.mkdir(parents=True)
    save_safetensors_streamed(specs, read, directory)
    atomic_write_json(directory / "config.json", {**config.to_dict(), "architectures": ["PuzzleForCausalLM"]})
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, directory)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("child")
    ap.add_argument("parent")
    ap.add_argument("out")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--num-sequences", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=2)
    ap.add_argument("--logit-positions", type=int, default=256)
    ap.add_argument("--alone", action="store_true", help="also evaluate the child alone (result_alone)")
    ap.add_argument("--other-child", help="also evaluate this child against the parent (result_other)")
    args = ap.parse_args()

    from puzzle.evaluation.sharded import evaluate_sharded
    from puzzle.loading import load_tokenizer
    from puzzle.peak import peak_rss_bytes, reset_peak, rss_bytes

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.parent)
    data = dict(sources=["stdlib"], seq_len=args.seq_len, num_sequences=args.num_sequences, chunk=args.chunk,
                logit_positions=args.logit_positions)
    before = rss_bytes()
    reset_peak()
    result = evaluate_sharded(args.child, args.parent, tokenizer, **data)
    out = {"result": result, "peak_rss": peak_rss_bytes(), "rss_before": before}
    if args.alone:
        out["result_alone"] = evaluate_sharded(args.child, None, tokenizer, **data)
    if args.other_child:
        out["result_other"] = evaluate_sharded(args.other_child, args.parent, tokenizer, **data)
    rank = int(os.environ.get("RANK", "0"))
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
