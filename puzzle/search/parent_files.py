"""The parent's files, read before a search writes anything: every safetensors header, and the tokenizer.

    check_weights(directory)      # CorruptArtifactError naming the file: a header that does not parse, a cut file
    check_tokenizer(directory)    # ModelFilesError: no tokenizer files, or files that do not load

:func:`puzzle.search.resolver.resolve` has read ``config.json``; the library stage is the first to read
the weights and the score stage the first to tokenize, minutes later and after ``plan.json`` and
``run.json`` were written. A header is a few kilobytes at the start of each file, so reading them all
costs nothing; its tensors' byte ranges must end inside the file, which catches a copy cut short without
reading the data. The tokenizer is loaded once here (about a second) and cached for the stages
(:func:`puzzle.loading.load_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path

from puzzle.errors import CorruptArtifactError, ModelFilesError, PuzzleError


def check_weights(directory: str | Path) -> list[Path]:
    """The parent's safetensors files, each with a header that parses and tensors that fit in the file."""
    from puzzle.io import safetensors_files, safetensors_header

    files = safetensors_files(directory)  # weights exist, and are safetensors (never a pickle)
    for path in files:
        header = safetensors_header(path)  # CorruptArtifactError naming the file
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")  # the data follow the length and the header
        try:
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (TypeError, KeyError, IndexError, ValueError):
            raise CorruptArtifactError(f"{path}: its safetensors header lists a tensor without data_offsets; the "
                                       "file is damaged: copy or save the weights again") from None
        size = path.stat().st_size
        if start + end > size:
            raise CorruptArtifactError(f"{path} is cut short: its header places tensors up to byte {start + end:,}, "
                                       f"the file has {size:,} bytes; copy or save the weights again")
    return files


def check_tokenizer(directory: str | Path) -> None:
    """The parent's tokenizer loads (:func:`puzzle.loading.load_tokenizer`, which the stages then reuse)."""
    from puzzle.loading import load_tokenizer

    try:
        load_tokenizer(directory)
    except PuzzleError:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers and transformers raise many types for a damaged file
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ModelFilesError(f"{directory}: its tokenizer does not load ({reason}); copy the tokenizer files "
                              "(tokenizer.json, tokenizer_config.json) from the model again") from None
