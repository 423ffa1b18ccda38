"""Primitives for reading files users hand us, shared by the tokenizer, the checkpoint readers and the data
modules: the error types for a missing or invalid input, and GGUF metadata access."""

from __future__ import annotations

import os
import zipfile
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


ZIP_MAGIC = b"PK\x03\x04"  # PyTorch's default checkpoint format is a zip archive


def check_input_file(path: PathLike, what: str, allow_dir: bool = False) -> Path:
    """``path`` as a Path after cheap checks that read at most its first bytes and its zip directory:
    :class:`CheckpointError` naming ``what`` and the file when it is missing, a folder (unless
    ``allow_dir``), empty, or a zip archive (PyTorch's format) cut short."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what} file not found: {p}")
    if p.is_dir():
        if allow_dir:
            return p
        raise CheckpointError(f"{what} path is not a file: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{what} file {p} is empty (0 bytes)")
    with open(p, "rb") as f:
        magic = f.read(len(ZIP_MAGIC))
    if magic == ZIP_MAGIC and not zipfile.is_zipfile(p):
        raise CheckpointError(f"{what} file {p} is truncated or corrupt (its zip directory, at the end of the "
                              f"file, is missing; {p.stat().st_size:,} bytes)")
    return p
