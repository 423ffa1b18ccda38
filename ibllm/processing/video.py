"""ImageBind video preprocessing (SPEC §5.2): PyAV decode, 5 clips x 2 frames x 3 crops = 15 views."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MediaError, open_source
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


def _decode_clip_frames(source, clip_duration: float, clips_per_video: int
                        ) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """Decode the video stream once and keep the first and last frame of each clip's ``[start, end)``."""
    import av

    src = open_source(source, "video", VIDEO_EXTENSIONS if isinstance(source, (str, Path)) else None)
    try:
        container = av.open(str(src) if isinstance(src, Path) else src)
    except Exception as e:  # noqa: BLE001 - any PyAV/FFmpeg failure is a decode error
        raise MediaError("video", source, f"cannot open video: {e}") from e
    with container:
        if not container.streams.video:
            raise MediaError("video", source, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = stream.time_base
        start_pts = stream.start_time or 0
        if stream.duration is not None and tb is not None:
            duration = float(stream.duration * tb)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = None
        if duration is None or duration <= 0:
            raise MediaError("video", source, "unknown or zero video duration")
        clips = clip_timepoints(duration, clip_duration, clips_per_video)
        last_end = max(e for _, e in clips)
        first: list = [None] * len(clips)
        last: list = [None] * len(clips)
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = Fraction(frame.pts - start_pts) * tb if tb is not None else Fraction(frame.time)
                if t >= last_end:
                    break
                for k, (s, e) in enumerate(clips):
                    if s <= t < e:
                        if first[k] is None:
                            first[k] = frame
                        last[k] = frame
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001
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


def load_video(
    path: str | Path | bytes,
    clip_duration: float = 2.0,
    clips_per_video: int = 5,
    frames_per_clip: int = 2,
    size: int = 224,
) -> Tensor:
    """ImageBind video preprocessing (SPEC §5.2) -> ``[clips*3, 3, frames_per_clip, size, size]``.

    Defaults give ``[15,3,2,224,224]``, clip-major (view ``3*k + c`` is clip ``k``, crop ``c``). Each clip
    holds the frames with ``start <= pts < end``; of them, the frames at ``linspace(0, T-1, 2)`` (first and
    last) are kept, scaled to [0,1], short-side bilinear-resized to ``size``, CLIP-normalised and cropped at
    the 3 offsets of :func:`crop_offsets`. Videos shorter than ``clip_duration`` repeat ``[0, clip_duration)``.
    ``frames_per_clip`` other than 2 is only supported as 1 or 2 (only first/last frames are kept in memory).
    """
    if frames_per_clip not in (1, 2):
        raise ValueError("frames_per_clip must be 1 or 2")
    pairs, _ = _decode_clip_frames(path, clip_duration, clips_per_video)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
    views = []
    for a, b in pairs:
        frames = [a] if frames_per_clip == 1 else [a, b]
        clip = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 255.0  # [C,T,H,W]
        clip = (short_side_scale(clip, size) - mean) / std
        h, w = clip.shape[-2:]
        for y, x in crop_offsets(h, w, size):
            views.append(clip[..., y: y + size, x: x + size])
    return torch.stack(views)
