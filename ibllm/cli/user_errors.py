"""A bad input ends a command with one line naming it, not a traceback.

The training verbs (``python -m ibllm fit`` ...) run inside :func:`one_line_errors`: an error about
something the user gave (a missing or unusable file, an unknown preset, a bad checkpoint or media file)
is printed last as ``python -m ibllm fit: error: MESSAGE`` and the command exits with status 2. With
``IBLLM_DEBUG=1`` in the environment the full traceback is printed first; any other exception (a bug)
keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from ibllm.files import InputError
from ibllm.processing.errors import MediaError
from ibllm.verbs.errors import CommandLineError, report

DEBUG_VARIABLE = "IBLLM_DEBUG"
# What a user can fix: our input errors (CheckpointError is an InputError) and missing files or folders.
USER_ERRORS: tuple[type[BaseException], ...] = (InputError, MediaError, CommandLineError, FileNotFoundError,
                                                 NotADirectoryError, IsADirectoryError)


def debugging() -> bool:
    """True when ``IBLLM_DEBUG`` is set to anything but empty, 0, false or no."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def describe(err: BaseException) -> str:
    """The user-facing text of ``err`` (an OSError as ``FILE: reason``)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err)


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Run the body; a :data:`USER_ERRORS` exception becomes ``PROG: error: MESSAGE`` on stderr as the last
    line, and exit status 2 (the traceback first with ``IBLLM_DEBUG=1``, else a hint on the line before)."""
    try:
        yield
    except USER_ERRORS as err:
        if debugging():
            traceback.print_exc()
        else:
            print(f"({DEBUG_VARIABLE}=1 shows the traceback)", file=sys.stderr)
        sys.stdout.flush()
        report(prog, describe(err))
