"""Primitives for reading files users hand us, shared by the tokenizer, the checkpoint readers and the data
modules: the error types for a missing or invalid input, and GGUF metadata access."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]
MISSING = object()  # "no default": a missing GGUF metadata key is an error


class InputError(ValueError):
    """A file or value the user gave is missing or invalid. The message names it and says what is wrong in
    one line: the command line prints it as its last line (``python -m ibllm fit: error: MESSAGE``)."""


class CheckpointError(InputError):
    """A checkpoint (or tokenizer) file is missing, unreadable, unsafe, or does not match what was expected."""


def open_gguf(path: PathLike) -> Any:
    """Open a GGUF file with ``gguf.GGUFReader`` (memory-mapped); CheckpointError if missing or invalid."""
    from gguf import GGUFReader  # imported on use: ~0.3 s, and most callers never read GGUF

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"GGUF file not found: {p}")
    try:
        return GGUFReader(p)
    except Exception as e:
        raise CheckpointError(f"cannot read GGUF file {p}: {type(e).__name__}: {e}") from e


def gguf_field(reader: Any, key: str, default: Any = MISSING) -> Any:
    """The decoded value of GGUF metadata ``key`` (strings, numbers, lists); ``default`` when absent."""
    field = reader.get_field(key)
    if field is None:
        if default is MISSING:
            raise CheckpointError(f"GGUF file {reader.data.filename}: metadata key {key!r} is missing")
        return default
    return field.contents()
