"""Bad and hostile inputs: media that names other files, stage-2 data skips, set-up errors.

* Media: a concat script or an HLS playlist handed to the audio/video loaders (as an upload's bytes or a
  file) is refused, and the file it names is never opened (a FIFO watched from a thread tells).
* Stage 2: missing/corrupt images and malformed items are skipped, counted and carried by the batch like
  stage 1's; items with wrong value types are refused with their file and index.
* Set-up (``python -m ibllm fit``, system tests): every bad input ends the output with one line naming the
  file and the problem, exits 2 and writes nothing into the run folder.
"""

from __future__ import annotations

import errno
import io
import json
import os
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from ibllm.processing.audio import read_audio
from ibllm.processing.av_input import ALLOWED_DEMUXERS, open_container
from ibllm.processing.errors import MediaError
from ibllm.processing.video import load_video


# ---- media that names other files --------------------------------------------------------------------------
class OpenWatch:
    """A FIFO at ``path`` that records whether anything opened it for reading.

    A thread keeps trying to open the write end without blocking, which only succeeds while a reader has it
    open; it then closes at once, so the reader sees an empty file instead of blocking.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no reader
                    raise
                time.sleep(0.002)
                continue
            self.opened = True
            os.close(fd)

    def __enter__(self) -> "OpenWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)  # let a reader that is just opening be seen
        self._stop.set()
        self._thread.join(timeout=5)


def write_clip(path: Path, fmt: str | None = None, codec: str = "mpeg4") -> Path:
    """A 2.5 s, 32x32 clip at 10 fps."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(25):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 8 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_concat_script_is_refused_and_the_named_file_never_opened(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # an upload's relative names resolve against the working folder
    script = b"ffconcat version 1.0\nfile secret.mp4\nduration 2.5\n"
    (tmp_path / "upload.mp4").write_bytes(script)
    with OpenWatch(tmp_path / "secret.mp4") as watch:
        # the control: FFmpeg left to itself takes the bytes for a concat script and opens the named file
        with pytest.raises(av.error.FFmpegError):
            with av.open(io.BytesIO(script)) as container:
                list(container.decode(video=0))
        assert watch.opened
        watch.opened = False
        for source in (script, tmp_path / "upload.mp4"):
            with pytest.raises(MediaError, match="not an allowed audio/video container"):
                load_video(source)
            with pytest.raises(MediaError, match="not an allowed audio/video container"):
                read_audio(source)
    assert not watch.opened


def test_concat_script_cannot_reach_a_real_video(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_clip(tmp_path / "secret.mp4")
    assert load_video(tmp_path / "secret.mp4").shape == (15, 3, 2, 224, 224)  # the file itself is a video
    with pytest.raises(MediaError, match="not an allowed"):
        load_video(b"ffconcat version 1.0\nfile secret.mp4\nduration 2.5\n")


def test_hls_playlist_is_refused_and_its_segment_never_opened(tmp_path) -> None:
    playlist = tmp_path / "list.m3u8"
    segment = tmp_path / "segment.ts"
    playlist.write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:3\n#EXTINF:2.5,\n"
                        f"{segment}\n#EXT-X-ENDLIST\n")
    with OpenWatch(segment) as watch:
        with pytest.raises(av.error.FFmpegError):  # the control: FFmpeg's HLS demuxer opens the segment
            with av.open(str(playlist)) as container:
                list(container.decode(video=0))
        assert watch.opened
        watch.opened = False
        for src in (playlist, io.BytesIO(playlist.read_bytes())):
            with pytest.raises(MediaError, match="not an allowed|cannot open"):
                open_container(src, "video", playlist)
    assert not watch.opened


@pytest.mark.parametrize("suffix,fmt,codec", [(".mp4", None, "mpeg4"), (".mkv", None, "mpeg4"),
                                              (".avi", None, "mpeg4"), (".ts", "mpegts", "mpeg4"),
                                              (".mov", None, "mpeg4"), (".flv", None, "flv"),
                                              (".wmv", "asf", "wmv2"), (".webm", None, "libvpx")])
def test_ordinary_containers_still_open(tmp_path, suffix, fmt, codec) -> None:
    path = write_clip(tmp_path / f"clip{suffix}", fmt, codec)
    for src in (path, io.BytesIO(path.read_bytes())):
        with open_container(src, "video", path) as container:
            assert any(part in ALLOWED_DEMUXERS for part in container.format.name.split(","))
            assert len(list(container.decode(video=0))) == 25
