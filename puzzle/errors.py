"""Typed errors. Each names what the user should fix; the CLI prints them without a traceback.

Every class derives from :class:`PuzzleError` and from the builtin exception a caller would
naturally catch (``ValueError`` for bad values, ``FileNotFoundError`` for missing files), so both
``except PuzzleError`` and the builtin work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class PuzzleError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class SchemaError(PuzzleError, ValueError):
    """An architecture description (block configs) is invalid."""


class ConfigError(PuzzleError, ValueError):
    """A configuration file or option is invalid (unknown key, wrong type, bad value)."""


class UnknownModelError(PuzzleError, ValueError):
    """A model name is neither an embedded model nor an existing directory."""


class ModelFilesError(PuzzleError, FileNotFoundError):
    """A model directory lacks a file it needs (config.json, weights, tokenizer)."""


class UnsupportedArchitectureError(PuzzleError, ValueError):
    """A checkpoint's architecture (or one of its options) is not supported."""


class UnsafeCheckpointError(PuzzleError, ValueError):
    """A checkpoint only offers pickle-based weights (.bin/.pt/.pth), which are never loaded."""


class CorruptArtifactError(PuzzleError, ValueError):
    """An artifact on disk is truncated, inconsistent with its manifest, or unreadable."""


class DataError(PuzzleError, ValueError):
    """A data source is missing, empty, or in a format that cannot be read."""


class ExportError(PuzzleError, ValueError):
    """An export cannot be written (destination exists, would overwrite the parent, ...)."""


class InfeasibleBudgetError(PuzzleError, ValueError):
    """No architecture meets the budget and constraints; the message says what is achievable."""


class SolverFailedError(PuzzleError, RuntimeError):
    """A MIP solver stopped without a usable answer, or its answer failed verification."""


class NumericalError(PuzzleError, FloatingPointError):
    """A loss or statistic became NaN or infinite (lower the learning rate, use float32)."""


class UnknownTargetError(PuzzleError, ValueError):
    """A hardware target (``8xH100``, ``cpu``) or its dtype is not known; the message lists the known ones."""


class ResourceError(PuzzleError, ValueError):
    """A stage does not fit the memory of the machines that run the search, even in rounds."""


class EngineError(PuzzleError, ValueError):
    """An architecture holds a sub-block the chosen serving engine cannot load (``--engine``)."""


class StaleArtifactError(PuzzleError, ValueError):
    """An output directory holds results computed from other inputs (rerun with --force to redo them)."""


class RunInUseError(PuzzleError, RuntimeError):
    """Another search is writing the run directory now (its lock, :mod:`puzzle.search.lock`, is held)."""


class StorageError(PuzzleError, OSError):
    """The file system refused a read or write (no space left, read-only, a file where a directory
    should be, permission denied): the message names the path, the cause and what to do. Every write
    is atomic, so a rerun after the cause is fixed resumes (:mod:`puzzle.os_errors`)."""


@contextlib.contextmanager
def solver_errors() -> Iterator[None]:
    """Re-raise the solvers package's typed errors as this toolkit's, inside the ``with`` block.

    ``solvers`` never imports puzzle, so its errors do not derive from :class:`PuzzleError`. A bad
    scores / costs table becomes :class:`DataError`, another malformed problem (unknown column, bad
    constraint) :class:`ConfigError`, an infeasible budget :class:`InfeasibleBudgetError`, and a solver
    that fails or whose answer fails verification :class:`SolverFailedError`; the message is kept.
    """
    from solvers.errors import InfeasibleError, ProblemError, SolverError, TableError  # torch-free, light

    try:
        yield
    except TableError as e:
        raise DataError(str(e)) from e
    except ProblemError as e:
        raise ConfigError(str(e)) from e
    except InfeasibleError as e:
        raise InfeasibleBudgetError(str(e)) from e
    except SolverError as e:
        raise SolverFailedError(str(e)) from e
