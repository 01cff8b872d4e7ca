"""The ``puzzle`` command: one entry point, one subcommand per stage.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``, which registers the
subcommand and sets ``func`` (a callable taking the parsed args and returning an exit code).
Errors derived from :class:`puzzle.errors.PuzzleError` are printed as one line, without a
traceback, and exit with status 2; so are the file system's refusals (a full disk, a read-only
``--out``, a file where a directory should be), which :func:`puzzle.os_errors.storage_error` turns
into a :class:`~puzzle.errors.StorageError` naming the path, the cause and the fix (``-v`` logs the
traceback). Every write is atomic, so the rerun after the fix resumes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from puzzle import __version__
from puzzle.errors import PuzzleError
from puzzle.os_errors import storage_error

log = logging.getLogger("puzzle.cli")

RESUMING_COMMANDS = frozenset({"search"})
"""Commands that resume a run directory: their storage errors promise that the rerun resumes."""

# Subcommand modules, in the order `puzzle --help` lists them. A new stage adds one line here.
COMMAND_MODULES = [
    "puzzle.cli.inspect_cmd",
    "puzzle.cli.export_cmd",
    "puzzle.cli.solve_cmd",
    "puzzle.cli.library_cmd",
    "puzzle.cli.profile_cmd",
    "puzzle.cli.score_cmd",
    "puzzle.cli.fuse_cmd",
    "puzzle.cli.distill_cmd",
    "puzzle.cli.evaluate_cmd",
    "puzzle.cli.plan_cmd",
    "puzzle.cli.search_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="puzzle",
        description="Distillation-based NAS: turn a Llama-family parent into a faster heterogeneous child.",
    )
    parser.add_argument("--version", action="version", version=f"puzzle {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="one subcommand per stage")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except PuzzleError as e:
        print(f"puzzle {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # an OSError (or safetensors' wrapped one) from anywhere; anything else re-raised
        error = storage_error(e, out=getattr(args, "out", None), resumes=args.command in RESUMING_COMMANDS)
        if error is None:
            raise
        log.debug("the file system refused a read or write", exc_info=True)
        print(f"puzzle {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"puzzle {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
