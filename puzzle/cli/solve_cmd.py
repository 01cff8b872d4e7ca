"""``puzzle solve`` and ``puzzle frontier``: the MIP over a scores table and a costs table.

    puzzle solve --scores scores.csv --costs costs.csv --memory-gib 80 --throughput 2000 \\
        --batch 64 --context 4096 --constraint "count(attention != no_op) >= 8" --out arch.json
    puzzle frontier --scores scores.csv --costs costs.csv --axis throughput --points 8 --out frontier.csv

The table formats are documented in :mod:`solvers.io`. Nothing here imports torch (the solvers
package never does), so both commands start fast. Errors of the solvers package are re-raised as
:class:`puzzle.errors.PuzzleError` subclasses (:func:`puzzle.errors.solver_errors`), which the CLI
prints as one line; output paths are checked before any table is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from puzzle.engines.rules import DEFAULT_ENGINE, ENGINE_NAMES
from puzzle.errors import ConfigError, solver_errors
from solvers.backends import BACKENDS, DEFAULT_BACKEND  # pure Python; the solver libraries load on use

if TYPE_CHECKING:
    from solvers.problem import Problem



def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scores", required=True, help="scores table (.csv or .parquet): layer, [span], variant, "
                   "one column per score (quality loss, lower is better); format in solvers/io.py")
    p.add_argument("--costs", required=True, help="costs table (.csv or .parquet): layer, [span], variant, params, "
                   "weight_bytes, kv_bytes_per_token, <scenario>_ms, [is_parent]; a layer -1 'fixed' row for "
                   "embeddings / LM head / overhead")
    p.add_argument("--score-column", default=None, help="score column to minimize (default: the only one)")
    p.add_argument("--scenario", default="decode", help="serving scenario: its latency column is "
                   "<scenario>_ms (default: decode)")
    p.add_argument("--phase", choices=("decode", "prefill"), default=None, help="step the latency column times: "
                   "decode (1 new token per sequence) or prefill (the whole prompt) (default: the scenario name "
                   "if it is a phase, else decode)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step per replica: throughput = replicas x "
                   "batch x new tokens / step time, and the KV cache holds batch x kv tokens per device (default: 1)")
    p.add_argument("--context", type=int, default=4096, help="prompt tokens (prefill) or tokens already in the KV "
                   "cache per sequence (decode; the cache then holds context + 1) (default: 4096)")
    p.add_argument("--replicas", type=int, default=1, help="model copies serving side by side on the target: "
                   "multiplies throughput, not memory per device (default: 1)")
    p.add_argument("--memory-gib", type=float, default=None, help="memory capacity in GiB for weights + KV cache "
                   "+ fixed bytes")
    p.add_argument("--throughput", type=float, default=None, help="minimum throughput in tokens/s")
    p.add_argument("--speedup", type=float, default=None, help="minimum step-time speedup over the parent "
                   "(needs is_parent)")
    p.add_argument("--latency-ms", type=float, default=None, help="maximum step time in ms (summed latency + fixed)")
    p.add_argument("--max-params", type=float, default=None, help="maximum parameter count (e.g. 70e9)")
    p.add_argument("--constraint", action="append", default=[], metavar="TEXT",
                   help="custom constraint, repeatable, e.g. 'count(attention != no_op) >= 8', "
                   "'layer[0] == parent', 'total(params) <= 70e9' (grammar in solvers/parse.py)")
    p.add_argument("--backend", choices=list(BACKENDS), default=DEFAULT_BACKEND,
                   help=f"MIP backend: pulp (CBC), cpsat (OR-tools CP-SAT), ortools-mip (OR-tools SCIP) "
                   f"(default: {DEFAULT_BACKEND})")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per solve before giving up (default: none)")
    p.add_argument("--engine", choices=ENGINE_NAMES, default=DEFAULT_ENGINE, help="serving engine the solution must "
                   "load in: candidates it cannot load are left out (puzzle/engines/rules.py) (default: vllm)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "solve", help="pick one block variant per layer within a budget (MIP)",
        description="Choose the candidates (one per layer, or multi-layer runs covering each layer once) that "
        "minimize the summed score within the memory / throughput / speedup / latency / parameter budget and the "
        "custom constraints. The solution is verified independently of the solver and written as JSON: "
        "block_configs (one per layer), chosen labels, predicted totals and each constraint's slack.")
    _common(p)
    p.add_argument("--out", required=True, help="solution JSON to write (atomically); --solutions K > 1 also "
                   "writes NAME.2.json ... NAME.K.json")
    p.add_argument("--solutions", type=int, default=1, help="number of diverse solutions, best first (default: 1)")
    p.add_argument("--min-diff", type=float, default=0.1, help="with --solutions: each solution differs from "
                   "every earlier one in at least this fraction of layers (default: 0.1)")
    p.set_defaults(func=run_solve)

    f = sub.add_parser(
        "frontier", help="solve over a grid of targets and tabulate / plot the optima",
        description="Solve once per target on one budget axis (the other budget flags stay fixed) and write a "
        "CSV table (target, status, objective, throughput, speedup, step_ms, memory_gib, params, seconds, reason) "
        "and a PNG plot of the objective against the target.")
    _common(f)
    f.add_argument("--axis", choices=("throughput", "speedup", "memory", "latency", "params"), default="throughput",
                   help="budget axis to sweep (default: throughput)")
    f.add_argument("--targets", default=None, help="comma-separated targets in the axis' units (tokens/s, x, "
                   "GiB, ms, parameters); default: --points targets from the unconstrained optimum to the best "
                   "achievable")
    f.add_argument("--points", type=int, default=8, help="number of targets when --targets is not given (default: 8)")
    f.add_argument("--out", required=True, help="frontier table to write (.csv)")
    f.add_argument("--plot", default=None, help="PNG to write (default: --out with .png); needs matplotlib")
    f.set_defaults(func=run_frontier)


def _output_file(text: str, *, flag: str, example: str) -> Path:
    """The file a flag names, refused (ConfigError naming the fix) if it is a directory, if a folder above it
    is a file (``FILE/x.json``), or if its folder is missing."""
    path = Path(text)
    if path.is_dir():
        raise ConfigError(f"{flag} {text} is a directory; give the file to write, e.g. {flag} {path / example}")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{flag} {text}: {blocker} is a file, not a directory; write elsewhere, e.g. "
                          f"{flag} {blocker.parent / path.name}")
    if not path.parent.is_dir():
        raise ConfigError(f"{flag} {text}: the directory {path.parent} does not exist; create it first "
                          f"(mkdir -p {path.parent}) or write elsewhere")
    return path


def _problem(args: argparse.Namespace) -> Problem:
    from solvers.constraints import Budget
    from solvers.io import read_problem
    from solvers.parse import parse_constraint
    from solvers.scenario import PHASES, Scenario

    budget = Budget(memory_bytes=None if args.memory_gib is None else args.memory_gib * 2**30,
                    throughput=args.throughput, speedup=args.speedup, latency_ms=args.latency_ms,
                    max_params=args.max_params)
    from puzzle.engines import engine_rules
    from puzzle.engines.problem import engine_problem

    problem = read_problem(args.scores, args.costs, score_column=args.score_column, budget=budget,
                           scenario=Scenario(name=args.scenario, batch=args.batch, length=args.context,
                                             phase=args.phase or (args.scenario if args.scenario in PHASES else "decode"),
                                             replicas=args.replicas),
                           constraints=tuple(parse_constraint(text) for text in args.constraint))
    return engine_problem(problem, engine_rules(args.engine))


def run_solve(args: argparse.Namespace) -> int:
    from solvers.diverse import diverse_solutions
    from solvers.io import write_json

    out = _output_file(args.out, flag="--out", example="arch.json")
    with solver_errors():
        if args.solutions < 1 or not 0.0 <= args.min_diff <= 1.0:
            raise ConfigError("--solutions must be >= 1 and --min-diff between 0 and 1")
        problem = _problem(args)
        solutions = diverse_solutions(problem, args.solutions, min_fraction=args.min_diff, backend=args.backend,
                                      time_limit=args.time_limit, progress=True)
    for k, sol in enumerate(solutions, start=1):
        path = out if k == 1 else out.with_name(f"{out.stem}.{k}{out.suffix}")
        write_json(path, {"rank": k, **sol.to_dict()})
        print(f"solution {k}: {sol.summary()}\nwrote {path}")
    if len(solutions) < args.solutions:
        print(f"only {len(solutions)} solution(s) differ from each other in >= {args.min_diff:.0%} of the layers")
    return 0


def run_frontier(args: argparse.Namespace) -> int:
    from solvers.frontier import frontier
    from solvers.io import atomic_write_text
    from solvers.plot import plot_frontier

    out = _output_file(args.out, flag="--out", example="frontier.csv")
    plot = _output_file(args.plot, flag="--plot", example="frontier.png") if args.plot else out.with_suffix(".png")
    with solver_errors():
        problem = _problem(args)
        targets = None
        if args.targets:
            try:
                targets = [float(t) * (2**30 if args.axis == "memory" else 1) for t in args.targets.split(",")]
            except ValueError:
                raise ConfigError(f"--targets must be comma-separated numbers, got {args.targets!r}") from None
        table = frontier(problem, axis=args.axis, targets=targets, points=args.points, backend=args.backend,
                         time_limit=args.time_limit, progress=True)
    atomic_write_text(out, table.to_csv(index=False))
    print(table.drop(columns=["reason"]).to_string(index=False))
    print(f"wrote {out}")
    try:
        plot_frontier(table, plot, axis=args.axis, score_column=problem.score_column)
        print(f"wrote {plot}")
    except ModuleNotFoundError as e:
        print(f"no plot: {e}")
    return 0
