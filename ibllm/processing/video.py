"""ImageBind video preprocessing: PyAV decode, 5 clips x 2 frames x 3 crops = 15 views.

Bounds on the work per video (module constants a caller may change; ``None`` switches one off):

- :data:`MAX_VIDEO_FRAME_PIXELS` (4096 x 2160): larger frames are refused from the stream header, before
  decoding (and any decoded frame over it stops the decode).
- :data:`MAX_DECODED_FRAMES` (20000): decoding stops with an error after this many frames. Clips far
  apart are reached by seeking, so a long seekable video decodes only a few thousand frames; the limit
  bites on very high frame rates or on long videos that cannot seek.
- :data:`MAX_ASPECT_RATIO` (100): frames more elongated than this are centre-cropped to the ratio before
  the short-side resize (which would otherwise make them thousands of times wider); videos within the
  ratio are processed exactly as before.

Only the first and last frame of each clip are kept, so memory does not grow with the video's length.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .av_input import open_container
from .errors import MediaError, central_span, check_limit, open_source
from .image import CLIP_MEAN, CLIP_STD

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".m4a", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".3gp", ".ts", ".gif", ".ogv")


def clip_timepoints(duration: float, clip_duration: float = 2.0, clips_per_video: int = 5
                    ) -> list[tuple[Fraction, Fraction]]:
    """Constant-clips-per-video sampler: ``clips_per_video`` ``(start, end)`` pairs as exact fractions.

    ``max_start = max(duration - clip_duration, 0)``; clip ``k`` starts at ``k * max_start / max(n-1, 1)``
    and ends ``clip_duration`` later (so a video shorter than ``clip_duration`` gives n copies of
    ``[0, clip_duration]``). ``duration`` (a float, e.g. ``samples / rate``) is converted exactly.
    """
    cd = Fraction(clip_duration)
    max_start = max(Fraction(duration) - cd, Fraction(0))
    step = max_start / max(clips_per_video - 1, 1)
    out = []
    for k in range(clips_per_video):
        start = step * k
        if start > max_start:
            break
        out.append((start, start + cd))
    return out


def short_side_scale(x: Tensor, size: int) -> Tensor:
    """``[C,T,H,W]`` -> bilinear (``align_corners=False``, no antialias) with short side ``size`` and long
    side ``floor(long / short * size)``."""
    h, w = x.shape[-2:]
    if w < h:
        new_w, new_h = size, int(math.floor(h / w * size))
    else:
        new_h, new_w = size, int(math.floor(w / h * size))
    if (new_h, new_w) == (h, w):
        return x
    return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)


def crop_offsets(height: int, width: int, size: int = 224) -> list[tuple[int, int]]:
    """The 3 spatial crops' ``(y, x)`` offsets: along the long side 0, ``ceil((L-size)/2)``, ``L-size``."""
    y0, x0 = math.ceil((height - size) / 2), math.ceil((width - size) / 2)
    if height > width:
        return [(0, x0), (y0, x0), (height - size, x0)]
    return [(y0, 0), (y0, x0), (y0, width - size)]


def crop_aspect(frame: np.ndarray, max_ratio: float | None) -> np.ndarray:
    """Centre-crop the long side of an ``[H, W, C]`` frame so that long / short is at most ``max_ratio``."""
    h, w = frame.shape[:2]
    span = central_span(max(h, w), min(h, w), max_ratio)
    if span is None:
        return frame
    start, length = span
    return frame[:, start: start + length] if w > h else frame[start: start + length]


SEEK_GAP_S = 3.0  # seek forward instead of decoding through gaps longer than this between clips
MAX_VIDEO_FRAME_PIXELS: int | None = 4096 * 2160
"""Largest frame (width x height) decoded."""
MAX_DECODED_FRAMES: int | None = 20000
"""Most frames decoded for one video (all decoding passes together)."""
MAX_ASPECT_RATIO: float | None = 100.0
"""Long side / short side above which frames are centre-cropped before resizing."""
_LIMIT = "ibllm.processing.video."


def _check_frame_size(source: object, width: int, height: int) -> None:
    check_limit("video", source, f"frame size {width}x{height} =", width * height, MAX_VIDEO_FRAME_PIXELS,
                _LIMIT + "MAX_VIDEO_FRAME_PIXELS")


class _SeekMiss(Exception):
    """A seek landed after the requested time (imprecise index): redo without seeking."""


def _clip_groups(clips: list[tuple[Fraction, Fraction]]) -> list[tuple[Fraction, Fraction, list[int]]]:
    """Merge overlapping clips (sorted by start) into ``(start, end, clip indices)`` decode ranges."""
    groups: list[tuple[Fraction, Fraction, list[int]]] = []
    for k, (s, e) in enumerate(clips):
        if groups and s < groups[-1][1]:
            gs, ge, members = groups[-1]
            groups[-1] = (gs, max(ge, e), members + [k])
        else:
            groups.append((s, e, [k]))
    return groups


class _Budget:
    """Counts decoded frames against :data:`MAX_DECODED_FRAMES` and checks their size."""

    def __init__(self, source: object) -> None:
        self.source, self.frames, self.limit = source, 0, MAX_DECODED_FRAMES

    def take(self, frame) -> None:
        self.frames += 1
        if self.limit is not None and self.frames > self.limit:
            raise MediaError("video", self.source, f"more than {self.limit:,} frames decoded (very high frame "
                                                   f"rate, or a long video that cannot seek) ({_LIMIT}MAX_DECODED_FRAMES)")
        _check_frame_size(self.source, frame.width, frame.height)


def _scan(container, stream, clips, seek: bool, budget: _Budget) -> tuple[list, list]:
    """One forward pass keeping the first and last frame of each clip; seeks over long gaps if ``seek``."""
    tb = stream.time_base
    start_pts = stream.start_time or 0
    first: list = [None] * len(clips)
    last: list = [None] * len(clips)
    frames = container.decode(stream)
    pending, decoded_until = None, Fraction(0)
    for gs, ge, members in _clip_groups(clips):
        check_landing = False
        if seek and gs - decoded_until > SEEK_GAP_S:
            container.seek(int(gs / tb) + start_pts, stream=stream, backward=True, any_frame=False)
            frames, pending, check_landing = container.decode(stream), None, True
        while True:
            if pending is None:
                pending = next(frames, None)
                if pending is None:
                    return first, last
                budget.take(pending)
                if pending.pts is None:
                    pending = None
                    continue
            t = Fraction(pending.pts - start_pts) * tb
            if check_landing and t > gs:
                raise _SeekMiss
            check_landing = False
            if t >= ge:
                break  # keep the frame for the next group
            for k in members:
                s, e = clips[k]
                if s <= t < e:
                    if first[k] is None:
                        first[k] = pending
                    last[k] = pending
            decoded_until, pending = t, None
    return first, last


def _decode_clip_frames(source, clip_duration: float, clips_per_video: int
                        ) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """Decode the video stream once and keep the first and last frame of each clip's ``[start, end)``."""
    src = open_source(source, "video", VIDEO_EXTENSIONS if isinstance(source, (str, Path)) else None)

    def open_video():
        if hasattr(src, "seek"):
            src.seek(0)
        return open_container(src, "video", source)

    budget = _Budget(source)
    for seek in (True, False):
        with open_video() as container:
            if not container.streams.video:
                raise MediaError("video", source, "no video stream")
            stream = container.streams.video[0]
            _check_frame_size(source, stream.codec_context.width or 0, stream.codec_context.height or 0)
            stream.thread_type = "AUTO"
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = 0.0
            if duration <= 0 or stream.time_base is None:
                raise MediaError("video", source, "unknown or zero video duration")
            clips = clip_timepoints(duration, clip_duration, clips_per_video)
            try:
                first, last = _scan(container, stream, clips, seek, budget)
            except _SeekMiss:
                continue
            except MediaError:
                raise
            except Exception as e:  # noqa: BLE001
                if seek:
                    continue  # some containers cannot seek: retry with a plain sequential decode
                raise MediaError("video", source, f"cannot decode video: {e}") from e
            if any(f is None for f in first):
                missing = [k for k, f in enumerate(first) if f is None]
                raise MediaError("video", source, f"no decodable frames in clip(s) {missing}")
            cache: dict[int, np.ndarray] = {}

            def rgb(frame) -> np.ndarray:
                if id(frame) not in cache:
                    cache[id(frame)] = frame.to_ndarray(format="rgb24")
                return cache[id(frame)]

            return [(rgb(a), rgb(b)) for a, b in zip(first, last)], duration
    raise AssertionError("unreachable")


def load_video(
    path: str | Path | bytes,
    clip_duration: float = 2.0,
    clips_per_video: int = 5,
    frames_per_clip: int = 2,
    size: int = 224,
) -> Tensor:
    """ImageBind video preprocessing -> ``[clips*3, 3, frames_per_clip, size, size]``.

    Defaults give ``[15,3,2,224,224]``, clip-major (view ``3*k + c`` is clip ``k``, crop ``c``). Each clip
    holds the frames with ``start <= pts < end``; of them, the frames at ``linspace(0, T-1, 2)`` (first and
    last) are kept, scaled to [0,1], short-side bilinear-resized to ``size``, CLIP-normalised and cropped at
    the 3 offsets of :func:`crop_offsets`. Videos shorter than ``clip_duration`` repeat ``[0, clip_duration)``.
    ``frames_per_clip`` other than 2 is only supported as 1 or 2 (only first/last frames are kept in memory).
    Frames more elongated than :data:`MAX_ASPECT_RATIO` are centre-cropped to it first; a video over the
    frame-size or decoded-frame limits raises :class:`MediaError`.
    """
    if frames_per_clip not in (1, 2):
        raise ValueError("frames_per_clip must be 1 or 2")
    pairs, _ = _decode_clip_frames(path, clip_duration, clips_per_video)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    views = []
    for a, b in pairs:
        frames = [crop_aspect(f, MAX_ASPECT_RATIO) for f in ([a] if frames_per_clip == 1 else [a, b])]
        clip = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 255.0  # [C,T,H,W]
        clip = (short_side_scale(clip, size) - mean) / std
        h, w = clip.shape[-2:]
        for y, x in crop_offsets(h, w, size):
            views.append(clip[..., y: y + size, x: x + size])
    return torch.stack(views)
