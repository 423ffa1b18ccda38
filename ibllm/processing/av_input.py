"""Opening audio and video with PyAV so that the input cannot make FFmpeg read anything else.

FFmpeg chooses a demuxer by probing the bytes it is given, and some demuxers read further files or URLs
named inside the input: a concat script (``ffconcat version 1.0`` / ``file other.mp4``) makes FFmpeg open
and decode a file of this machine, an HLS playlist fetches its segments from disk or the network, and
there are more. Given an upload, that lets its sender have local files read (and described by the
model). :func:`open_container` closes both doors before any demuxer runs:

* ``format_whitelist``: only the demuxers of ordinary audio/video containers (:data:`ALLOWED_DEMUXERS`);
  FFmpeg checks the probed format against it before the demuxer reads its header, and nested inputs
  inherit the list;
* ``protocol_whitelist``: a path input may use the ``file`` protocol (for itself); an in-memory input
  (bytes, a file object) no protocol at all, so nothing else can be opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ibllm.processing.errors import MediaError

# Demuxers of self-contained containers and raw audio/video streams (matched against each comma-separated
# part of FFmpeg's format name: mov covers mp4/m4a/3gp, matroska covers webm). None of them opens other
# files by default (mov's external data references are off unless enable_drefs is set; it is set to 0).
ALLOWED_DEMUXERS = ("mov", "matroska", "avi", "asf", "mpegts", "mpeg", "mpegvideo", "m4v", "flv", "gif", "ogg",
                    "aac", "mp3", "wav", "w64", "flac", "aiff", "au", "caf")
# A protocol name no FFmpeg protocol has: a whitelist of it allows none.
NO_PROTOCOL = "none"


def container_options(src: Any) -> dict[str, str]:
    """The FFmpeg options of :func:`open_container` for ``src`` (a path, or a file object)."""
    return {"format_whitelist": ",".join(ALLOWED_DEMUXERS),
            "protocol_whitelist": "file" if isinstance(src, (str, Path)) else NO_PROTOCOL,
            "enable_drefs": "0"}


def is_allowed_format(name: str) -> bool:
    """True when FFmpeg format name ``name`` (``"mov,mp4,m4a,3gp,3g2,mj2"``) is one of the allowed demuxers."""
    return any(part in ALLOWED_DEMUXERS for part in name.split(","))


def open_container(src: Any, modality: str, source: Any) -> Any:
    """``av.open(src)`` for reading, restricted to :data:`ALLOWED_DEMUXERS` and no other file or URL.

    ``src``: a path or a readable binary file object; ``modality`` / ``source`` name the input in errors.
    Raises :class:`MediaError` when FFmpeg cannot open it, or when it is of another format (a playlist,
    a concat script, ...), saying so.
    """
    import av  # imported on use: PyAV is heavy and only audio/video need it

    target = str(src) if isinstance(src, Path) else src
    try:
        container = av.open(target, mode="r", container_options=container_options(target))
    except av.error.ArgumentError as e:  # the probed format is not on the whitelist
        raise MediaError(modality, source, "not an allowed audio/video container (playlists, concat scripts "
                                           "and other formats that read further files are refused)") from e
    except Exception as e:  # noqa: BLE001 - any PyAV/FFmpeg failure to open is a decode error
        raise MediaError(modality, source, f"cannot open {modality}: {e}") from e
    name = getattr(container.format, "name", "") or ""
    if not is_allowed_format(name):  # a second check; FFmpeg's whitelist has already refused these
        container.close()
        raise MediaError(modality, source, f"container format {name!r} is not allowed")
    return container
