"""Video preprocessing: clip times, first/last frame per clip, resize, 3 crops, errors."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from ibllm.processing import CLIP_MEAN, CLIP_STD, MediaError, load_audio, load_modality, load_video
from ibllm.processing import video as video_mod
from ibllm.processing.video import clip_timepoints, crop_offsets, short_side_scale

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1, 1)
FPS = 10


def write_video(path, frames: list[np.ndarray], fps: int = FPS, codec: str = "mpeg4") -> str:
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for arr in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return str(path)


def ramp_frames(n: int, h: int = 64, w: int = 96) -> list[np.ndarray]:
    """Frame i is a flat grey of level 4*i: the decoded level identifies the frame."""
    return [np.full((h, w, 3), 4 * i, np.uint8) for i in range(n)]


def decoded_levels(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.array([f.to_ndarray(format="rgb24").mean() for f in c.decode(video=0)])


def view_level(view: torch.Tensor) -> float:
    """Undo the normalisation of a [3,T,H,W] view frame-wise -> mean level in 0..255 per frame."""
    return ((view * STD + MEAN) * 255).mean(dim=(0, 2, 3))


def test_clip_frames_follow_spec_times(tmp_path):
    p = write_video(tmp_path / "ramp.mp4", ramp_frames(60))  # 6 s at 10 fps
    levels = decoded_levels(p)
    x = load_video(p)
    assert x.shape == (15, 3, 2, 224, 224) and x.dtype == torch.float32
    starts = [s for s, _ in clip_timepoints(6.0, 2.0, 5)]
    assert starts == [0, 1, 2, 3, 4]
    for k, s in enumerate(starts):
        first = int(s * FPS)  # frames in [s, s + 2): first and last
        want = torch.tensor([levels[first], levels[first + 19]], dtype=torch.float32)
        for c in range(3):
            torch.testing.assert_close(view_level(x[3 * k + c]), want, atol=0.05, rtol=0)


def test_fractional_clip_starts(tmp_path):
    p = write_video(tmp_path / "r7.mp4", ramp_frames(51))  # 5.1 s: step = 3.1/4 = 0.775 s
    levels = decoded_levels(p)
    x = load_video(p)
    times = clip_timepoints(5.1, 2.0, 5)
    assert times[1][0] == (Fraction(5.1) - 2) / 4
    for k, (s, e) in enumerate(times):
        idx = [i for i in range(51) if s <= Fraction(i, FPS) < e]
        want = torch.tensor([levels[idx[0]], levels[idx[-1]]], dtype=torch.float32)
        torch.testing.assert_close(view_level(x[3 * k]), want, atol=0.05, rtol=0)


def test_short_video_repeats_whole_clip(tmp_path):
    p = write_video(tmp_path / "short.mp4", ramp_frames(12))  # 1.2 s < 2 s
    levels = decoded_levels(p)
    x = load_video(p)
    assert x.shape == (15, 3, 2, 224, 224)
    for v in range(15):
        torch.testing.assert_close(view_level(x[v]), torch.tensor([levels[0], levels[11]], dtype=torch.float32),
                                   atol=0.05, rtol=0)


def test_constant_colour_and_crops(tmp_path):
    assert crop_offsets(224, 336) == [(0, 0), (0, 56), (0, 112)]
    assert crop_offsets(398, 224) == [(0, 0), (87, 0), (174, 0)]  # ceil(174/2) = 87
    assert crop_offsets(224, 225) == [(0, 0), (0, 1), (0, 1)]
    assert short_side_scale(torch.zeros(3, 2, 64, 96), 224).shape == (3, 2, 224, 336)
    assert short_side_scale(torch.zeros(3, 2, 100, 57), 224).shape == (3, 2, 392, 224)  # floor(100/57*224)
    frame = np.zeros((64, 96, 3), np.uint8)
    frame[:, 48:] = 255  # left half black, right half white
    p = write_video(tmp_path / "lr.mp4", [frame] * 25)
    x = load_video(p)
    m = [view_level(x[c]).mean().item() for c in range(3)]
    # crops at x = 0, 56, 112 of a 336-wide frame whose white half starts at 168
    assert m[0] < m[1] < m[2]
    assert abs(m[0] - 255 * 56 / 224) < 8 and abs(m[1] - 255 * 112 / 224) < 8 and abs(m[2] - 255 * 168 / 224) < 8
    grey = write_video(tmp_path / "grey.mp4", [np.full((48, 48, 3), 128, np.uint8)] * 25)
    g = load_video(grey)
    assert torch.allclose(view_level(g[4]), torch.tensor([128.0, 128.0]), atol=1.5)


def test_h264_portrait_and_batch(tmp_path):
    try:
        p = write_video(tmp_path / "h.mp4", ramp_frames(30, h=96, w=64), codec="libx264")
    except Exception:  # noqa: BLE001 - h264 encoder may be absent from a PyAV build
        pytest.skip("no libx264 encoder")
    x = load_video(p)
    assert x.shape == (15, 3, 2, 224, 224)
    batch = load_modality("video", [p, open(p, "rb").read()])
    assert batch.shape == (2, 15, 3, 2, 224, 224) and torch.equal(batch[0], x)


def write_audio_only(path, seconds: float = 1.0, sr: int = 44100) -> str:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=sr)
        s.layout = "mono"
        t = np.arange(int(seconds * sr)) / sr
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        for i in range(0, samples.shape[1], 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, i:i + 1024]), format="fltp",
                                           layout="mono")
            f.sample_rate = sr
            for pkt in s.encode(f):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return str(path)


def test_audio_only_file(tmp_path):
    p = write_audio_only(tmp_path / "sound.m4a")
    with pytest.raises(MediaError, match=r"video .*sound\.m4a.*no video stream"):
        load_video(p)
    a = load_audio(p)  # decoded through PyAV
    assert a.shape == (3, 1, 128, 204) and torch.isfinite(a).all()
    mp4 = write_audio_only(tmp_path / "sound.mp4")
    with pytest.raises(MediaError, match=r"video item 0 .*sound\.mp4.*no video stream"):
        load_modality("video", [mp4])


def test_errors(tmp_path):
    with pytest.raises(MediaError, match=r"video .*gone\.mp4.*file not found"):
        load_video(tmp_path / "gone.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(MediaError, match=r"video .*bad\.mp4.*cannot"):
        load_video(bad)
    (tmp_path / "v.doc").write_text("x")
    with pytest.raises(MediaError, match=r"video .*v\.doc.*unsupported extension"):
        load_video(tmp_path / "v.doc")
    ok = write_video(tmp_path / "ok.mp4", ramp_frames(5))
    with pytest.raises(MediaError, match=r"video item 1 .*bad\.mp4"):
        load_modality("video", [ok, bad])


def test_long_video_seeks_to_the_same_frames(tmp_path, monkeypatch):
    fps, n = 5, 200  # 40 s: clip starts 0, 9.5, 19, 28.5, 38 -> gaps worth seeking over
    frames = [np.full((32, 48, 3), (7 * i) % 250, np.uint8) for i in range(n)]
    p = write_video(tmp_path / "long.mp4", frames, fps=fps)
    levels = decoded_levels(p)
    seeked = load_video(p)
    monkeypatch.setattr(video_mod, "SEEK_GAP_S", 1e9)
    assert torch.equal(seeked, load_video(p))
    for k, (s, e) in enumerate(clip_timepoints(40.0, 2.0, 5)):
        idx = [i for i in range(n) if s <= Fraction(i, fps) < e]
        want = torch.tensor([levels[idx[0]], levels[idx[-1]]], dtype=torch.float32)
        torch.testing.assert_close(view_level(seeked[3 * k + 1]), want, atol=0.05, rtol=0)
