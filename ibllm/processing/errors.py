"""The one error type of the media loaders."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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


def open_source(source: Any, modality: str, extensions: tuple[str, ...] | None = None) -> Any:
    """Check a path/bytes source and return something a decoder can open.

    Returns the :class:`~pathlib.Path` of an existing file, or an ``io.BytesIO`` for ``bytes``. Raises
    :class:`MediaError` for a missing file, a directory, an empty byte string, or (when ``extensions`` is
    given) a file extension outside that set.
    """
    import io

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise MediaError(modality, source, "empty byte string")
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
    return path
