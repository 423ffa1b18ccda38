"""The one error type of the media loaders, and the input-size checks they share.

Every loader bounds the work one input can cause (pixels, samples, frames, points, bytes read) with
limits that are module-level constants of its own module (``ibllm.processing.image.MAX_IMAGE_PIXELS``
and so on); an input over a limit raises :class:`MediaError` naming the file, the size and the constant.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np


def describe_source(source: Any) -> str:
    """A short, human-readable name for a media source (a path, ``<N bytes>``, or the object type)."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    name = getattr(source, "filename", None) or getattr(source, "name", None)
    if isinstance(name, (str, Path)) and str(name):
        return str(name)
    return f"<{type(source).__name__}>"


class MediaError(ValueError):
    """A media item could not be loaded.

    The message always names the modality and the file (or ``<N bytes>`` for in-memory data), plus the
    item index when the error comes from a batch (``load_modality``):
    ``"audio item 2 ('clip.wav'): cannot decode: ..."``.
    """

    def __init__(self, modality: str, source: Any, reason: str, index: int | None = None) -> None:
        self.modality = modality
        self.source = describe_source(source)
        self.reason = reason
        self.index = index
        where = f"{modality} item {index}" if index is not None else f"{modality}"
        super().__init__(f"{where} ({self.source!r}): {reason}")

    def with_index(self, index: int) -> "MediaError":
        """The same error, tagged with its position in a batch."""
        return MediaError(self.modality, self.source, self.reason, index)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader workers
        return (MediaError, (self.modality, self.source, self.reason, self.index))


def over_limit(what: str, value: float, limit: float | None, constant: str) -> str | None:
    """The refusal reason when ``value`` exceeds ``limit`` (``None``: no limit), else ``None``.

    ``constant`` is the dotted name of the module constant holding the limit, so the message says what a
    caller can raise: ``"point count 20,000,000 is over the limit of 2,000,000 (ibllm...MAX_POINTS)"``."""
    if limit is None or value <= limit:
        return None
    return f"{what} {value:,} is over the limit of {limit:,} ({constant})"


def check_limit(modality: str, source: Any, what: str, value: float, limit: float | None, constant: str) -> None:
    """Raise :class:`MediaError` for ``source`` when ``value`` exceeds ``limit`` (see :func:`over_limit`)."""
    reason = over_limit(what, value, limit, constant)
    if reason is not None:
        raise MediaError(modality, source, reason)


def npy_shape(data: bytes) -> tuple[int, ...] | None:
    """The array shape a ``.npy`` byte string declares in its header (nothing else is parsed), or ``None``
    when ``data`` is not a readable ``.npy`` header (the full load then reports the problem)."""
    fp = io.BytesIO(data[:65536])
    try:
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(fp)
    except (ValueError, OSError, SyntaxError, TypeError):
        return None
    return tuple(int(n) for n in shape)


def central_span(long: int, short: int, max_ratio: float | None) -> tuple[int, int] | None:
    """``(start, length)`` of the centred part of a side of length ``long`` that brings a ``long x short``
    picture down to the aspect ratio ``max_ratio``, or ``None`` when it is within the ratio already."""
    if max_ratio is None or long <= short * max_ratio:
        return None
    length = max(1, int(short * max_ratio))
    return (long - length) // 2, length


def open_source(source: Any, modality: str, extensions: tuple[str, ...] | None = None,
                max_bytes: int | None = None, limit_name: str = "") -> Any:
    """Check a path/bytes source and return something a decoder can open.

    Returns the :class:`~pathlib.Path` of an existing file, or an ``io.BytesIO`` for ``bytes``. Raises
    :class:`MediaError` for a missing file, a directory, an empty byte string, (when ``extensions`` is
    given) a file extension outside that set, or (when ``max_bytes`` is given) a file or byte string larger
    than ``max_bytes``, checked before anything is read; ``limit_name`` names that limit's constant.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise MediaError(modality, source, "empty byte string")
        check_limit(modality, source, "size in bytes", len(source), max_bytes, limit_name)
        return io.BytesIO(bytes(source))
    if not isinstance(source, (str, Path)):
        raise MediaError(modality, source, f"unsupported source type {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise MediaError(modality, source, "file not found")
    if path.is_dir():
        raise MediaError(modality, source, "is a directory, expected a file")
    if extensions is not None and path.suffix.lower() not in extensions:
        raise MediaError(
            modality, source, f"unsupported extension {path.suffix!r}; expected one of {', '.join(extensions)}"
        )
    if max_bytes is not None:
        check_limit(modality, source, "size in bytes", path.stat().st_size, max_bytes, limit_name)
    return path
