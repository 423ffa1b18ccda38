"""Bounded work per input: decompression and aspect bombs, odd audio, long videos, huge point clouds and
sensor arrays are refused with one clear message naming the file, or processed in bounded memory; ordinary
inputs come out exactly as without the limits. Also the browser demo's upload size limit and clean-up."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from ibllm.processing import (
    CLIP_MEAN, CLIP_STD, MediaError, load_audio, load_depth, load_image, load_imu, load_point_cloud, load_thermal,
    load_video,
)
from ibllm.processing import audio as audio_mod
from ibllm.processing import image as image_mod
from ibllm.processing import point as point_mod
from ibllm.processing import sensors as sensors_mod
from ibllm.processing import video as video_mod

LIMITS = {
    image_mod: ("MAX_IMAGE_PIXELS", "MAX_ASPECT_RATIO"),
    audio_mod: ("MAX_AUDIO_SECONDS", "MAX_AUDIO_SAMPLES", "MAX_AUDIO_CHANNELS", "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE",
                "MAX_RESAMPLE_FILTER"),
    video_mod: ("MAX_VIDEO_FRAME_PIXELS", "MAX_DECODED_FRAMES", "MAX_ASPECT_RATIO"),
    point_mod: ("MAX_POINT_FILE_BYTES", "MAX_POINTS"),
    sensors_mod: ("MAX_SENSOR_FILE_BYTES", "MAX_SENSOR_ELEMENTS", "MAX_ASPECT_RATIO"),
}


def refused(call, path: Path, *words: str) -> str:
    """Run ``call``; it must raise one MediaError naming ``path`` and containing ``words``."""
    with pytest.raises(MediaError) as info:
        call()
    message = str(info.value)
    assert path.name in message, message
    for word in words:
        assert word in message, message
    assert "\n" not in message
    return message


# ---- crafted files ---------------------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header declares ``width x height`` RGB pixels (the data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def npy_declaring(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """A ``.npy`` header declaring ``shape`` followed by 64 bytes of data (the rest is missing)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\0" * 64


def write_video(path: Path, width: int, height: int, frames: int, rate: int = 10) -> Path:
    """A small MPEG-4 video of random frames, written with PyAV."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---- peak memory, measured in a fresh process ---------------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent('''
    import io, json, resource, sys
    import numpy as np
    from PIL import Image
    from ibllm.processing import load_depth, load_image, load_thermal

    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (1, 2, 3)).save(buf, "PNG", optimize=True)
        return buf.getvalue()

    cases = {
        "png_20000x1": lambda: (len(data := png(20000, 1)), load_image(data)),
        "png_1x20000": lambda: (len(data := png(1, 20000)), load_image(data)),
        "depth_2x20000": lambda: (0, load_depth(np.ones((2, 20000), np.float32))),
        "thermal_20000x2": lambda: (0, load_thermal(np.ones((20000, 2), np.float32))),
    }
    load_image(png(300, 200)), load_depth(np.ones((30, 20), np.float32))  # imports and lazy initialisation
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size, out = cases[sys.argv[1]]()
    extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"bytes": size, "shape": list(out.shape), "extra_mb": extra / 1024}))
''')


def peak_extra_mb(case: str) -> dict:
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, case], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["png_20000x1", "png_1x20000", "depth_2x20000", "thermal_20000x2"])
def test_aspect_bomb_bounded_memory(case):
    """A 141-byte 20000x1 PNG used to peak at ~4 GB (short side resized to 224 -> 4.5 million pixels wide)."""
    got = peak_extra_mb(case)
    assert got["shape"] in ([3, 224, 224], [1, 224, 224])
    if case.startswith("png"):
        assert got["bytes"] < 250
    assert got["extra_mb"] < 300, got


# ---- images ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(9000, 9000), (100_000, 100_000), (2**31 - 1, 1)])
def test_png_declaring_huge_size_refused_before_decoding(tmp_path, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(*size))
    assert path.stat().st_size < 200
    refused(lambda: load_image(path), path, "pixels")


def test_pixel_limit_is_configurable_and_honours_pil(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.new("RGB", (40, 30), (9, 9, 9)).save(path)
    assert load_image(path).shape == (3, 224, 224)
    monkeypatch.setattr(image_mod, "MAX_IMAGE_PIXELS", 1000)
    refused(lambda: load_image(path), path, "40x30", "MAX_IMAGE_PIXELS")
    monkeypatch.setattr(image_mod, "MAX_IMAGE_PIXELS", None)
    assert load_image(path).shape == (3, 224, 224)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own limit, when lower, is honoured too
    with pytest.warns(Image.DecompressionBombWarning):  # PIL warns between its limit and twice it
        refused(lambda: load_image(path), path, "1,200 pixels")


def reference_eval_transform(img: Image.Image, size: int = 224) -> torch.Tensor:
    """The eval transform written out with PIL alone: short side bicubic to ``size`` (long side
    ``int(size * long / short)``), centre crop with rounded offsets, to [0,1], CLIP mean/std."""
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        img = img.resize((size, int(h * scale)) if w <= h else (int(w * scale), size), Image.BICUBIC)
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (224, 224), (37, 19), (1000, 45), (4000, 50), (50, 4900),
                                  (1, 1), (1500, 1000)])
def test_ordinary_images_unchanged(tmp_path, size):
    rng = np.random.default_rng(sum(size))
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    x = load_image(path)
    assert torch.equal(x, reference_eval_transform(Image.open(path)))


def test_extreme_aspect_is_centre_cropped_first(tmp_path):
    """Beyond MAX_ASPECT_RATIO the image is first centre-cropped to that ratio; the 224 centre crop of the
    result shows the same middle of the image as the full resize would (up to resampling rounding)."""
    rng = np.random.default_rng(1)
    row = np.repeat(rng.integers(0, 256, (1, 600, 3), dtype=np.uint8), 4, axis=0)  # 4 x 600, ratio 150
    img = Image.fromarray(row)
    x = load_image(img)
    full = reference_eval_transform(img)
    assert x.shape == (3, 224, 224)
    assert (x - full).abs().mean() < 0.05


# ---- audio -----------------------------------------------------------------------------------------------------


def test_eight_channel_wav_refused(tmp_path):
    path = tmp_path / "array.wav"
    sf.write(path, np.zeros((1600, 8), np.float32), 16000)
    refused(lambda: load_audio(path), path, "8 channels", "MAX_AUDIO_CHANNELS")


def test_one_hertz_wav_refused(tmp_path):
    path = tmp_path / "slow.wav"
    sf.write(path, np.zeros((100, 1), np.float32), 1)
    refused(lambda: load_audio(path), path, "sample rate 1 Hz", "MIN_SAMPLE_RATE")


def test_odd_rate_needing_a_huge_resampling_filter_refused(tmp_path):
    path = tmp_path / "odd.wav"
    sf.write(path, np.zeros((4410, 1), np.float32), 44101)  # gcd(44101, 16000) = 1: a 700M-coefficient filter
    refused(lambda: load_audio(path), path, "44101 Hz", "MAX_RESAMPLE_FILTER")
    assert audio_mod.resample_filter_size(44100, 16000) < 300_000


def test_very_long_audio_refused_from_header(tmp_path):
    path = tmp_path / "long.wav"
    seconds = audio_mod.MAX_AUDIO_SECONDS + 1
    sf.write(path, np.zeros((int(seconds * 4000), 1), np.float32), 4000, subtype="PCM_U8")
    refused(lambda: load_audio(path), path, "duration 601.0 s", "MAX_AUDIO_SECONDS")


def test_long_audio_in_a_video_container_refused(tmp_path, monkeypatch):
    """The PyAV path (AAC in MP4) checks the stream's declared duration and counts samples while decoding."""
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(30):  # 30 x 1024 samples: ~1.9 s
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert load_audio(path).shape == (3, 1, 128, 204)
    monkeypatch.setattr(audio_mod, "MAX_AUDIO_SECONDS", 1.0)
    refused(lambda: load_audio(path), path, "duration", "MAX_AUDIO_SECONDS")


# ---- video -----------------------------------------------------------------------------------------------------


def test_video_with_too_many_frames_refused(tmp_path, monkeypatch):
    path = write_video(tmp_path / "many.mp4", 32, 32, 60)
    assert load_video(path).shape == (15, 3, 2, 224, 224)
    monkeypatch.setattr(video_mod, "MAX_DECODED_FRAMES", 20)
    refused(lambda: load_video(path), path, "more than 20 frames", "MAX_DECODED_FRAMES")


def test_video_frame_size_refused_from_header(tmp_path, monkeypatch):
    path = write_video(tmp_path / "big.mp4", 64, 48, 4)
    monkeypatch.setattr(video_mod, "MAX_VIDEO_FRAME_PIXELS", 64 * 48 - 1)
    refused(lambda: load_video(path), path, "64x48", "MAX_VIDEO_FRAME_PIXELS")


def test_extreme_aspect_video_is_cropped(tmp_path):
    path = write_video(tmp_path / "strip.mp4", 1632, 16, 12)  # ratio 102: centre-cropped to 1600 x 16
    x = load_video(path)
    assert x.shape == (15, 3, 2, 224, 224) and torch.isfinite(x).all()


# ---- point clouds ------------------------------------------------------------------------------------------------


def test_npy_declaring_too_many_points_refused_from_header(tmp_path):
    path = tmp_path / "huge.npy"
    path.write_bytes(npy_declaring((10**9, 3)))
    refused(lambda: load_point_cloud(path), path, "point count 1,000,000,000", "MAX_POINTS")


def test_ply_declaring_too_many_points_refused_from_header(tmp_path):
    path = tmp_path / "huge.ply"
    path.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1000000000\nproperty float x\n"
                     b"property float y\nproperty float z\nend_header\n" + b"\0" * 120)
    refused(lambda: load_point_cloud(path), path, "point count 1,000,000,000")


def test_pcd_declaring_too_many_points_refused(tmp_path):
    path = tmp_path / "huge.pcd"
    path.write_bytes(b"VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 5000000\nHEIGHT 1\n"
                     b"POINTS 5000000\nDATA binary\n" + b"\0" * 120)
    refused(lambda: load_point_cloud(path), path, "point count 5,000,000")


def test_text_cloud_point_limit_and_file_size(tmp_path, monkeypatch):
    path = tmp_path / "cloud.xyz"
    path.write_text("\n".join(f"{i} {i % 7} {i % 5}" for i in range(101)))
    assert load_point_cloud(path).shape == (8192, 3)
    monkeypatch.setattr(point_mod, "MAX_POINTS", 100)
    refused(lambda: load_point_cloud(path), path, "point count 101", "MAX_POINTS")
    monkeypatch.setattr(point_mod, "MAX_POINTS", 2_000_000)
    monkeypatch.setattr(point_mod, "MAX_POINT_FILE_BYTES", 100)
    refused(lambda: load_point_cloud(path), path, "size in bytes", "MAX_POINT_FILE_BYTES")


# ---- depth / thermal / IMU ----------------------------------------------------------------------------------------


def test_sensor_arrays_declaring_huge_sizes_refused(tmp_path):
    depth = tmp_path / "depth.npy"
    depth.write_bytes(npy_declaring((100_000, 100_000)))
    refused(lambda: load_depth(depth), depth, "MAX_SENSOR_ELEMENTS")
    imu = tmp_path / "imu.npy"
    imu.write_bytes(npy_declaring((10**9, 6)))
    refused(lambda: load_imu(imu), imu, "MAX_SENSOR_ELEMENTS")
    thermal = tmp_path / "thermal.png"
    thermal.write_bytes(png_declaring(9000, 9000))
    refused(lambda: load_thermal(thermal), thermal, "declared size 9000x9000", "MAX_SENSOR_ELEMENTS")


# ---- ordinary inputs: the limits change nothing -------------------------------------------------------------------


def ordinary_inputs(tmp: Path) -> dict[str, tuple]:
    rng = np.random.default_rng(3)
    paths = {}
    paths["image"] = tmp / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(paths["image"])
    paths["audio"] = tmp / "stereo.wav"
    sf.write(paths["audio"], rng.uniform(-0.5, 0.5, (44100 * 3, 2)), 44100)
    paths["video"] = write_video(tmp / "clip.mp4", 64, 48, 30)
    paths["point"] = tmp / "cloud.npy"
    np.save(paths["point"], rng.normal(size=(5000, 3)).astype(np.float32))
    paths["depth"] = tmp / "depth.png"
    Image.fromarray((rng.uniform(0.5, 5, (120, 160)) * 1000).astype(np.uint16)).save(paths["depth"])
    paths["thermal"] = tmp / "thermal.png"
    Image.fromarray(rng.integers(0, 256, (120, 160), dtype=np.uint8)).save(paths["thermal"])
    paths["imu"] = tmp / "imu.npy"
    np.save(paths["imu"], rng.normal(size=(3000, 6)).astype(np.float32))
    loaders = {"image": load_image, "audio": load_audio, "video": load_video, "point": load_point_cloud,
               "depth": load_depth, "thermal": load_thermal, "imu": load_imu}
    return {m: (loaders[m], p) for m, p in paths.items()}


def test_ordinary_inputs_identical_with_and_without_limits(tmp_path, monkeypatch):
    inputs = ordinary_inputs(tmp_path)
    bounded = {m: load(p) for m, (load, p) in inputs.items()}
    for module, names in LIMITS.items():
        for name in names:
            monkeypatch.setattr(module, name, None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    for m, (load, p) in inputs.items():
        assert torch.equal(bounded[m], load(p)), m


# ---- the browser demo ------------------------------------------------------------------------------------------


def test_session_uploads_deleted_when_session_ends(tmp_path):
    from ibllm.web_uploads import SessionUploads

    own, shared = tmp_path / "a" / "own.png", tmp_path / "b" / "shared.png"
    for p in (own, shared):
        p.parent.mkdir()
        p.write_bytes(b"x")
    uploads = SessionUploads()
    uploads.add("s1", str(own))
    uploads.add("s1", str(shared))
    uploads.add("s1", None)
    uploads.add("s2", str(shared))  # the same content uploaded by another session: one file
    assert uploads.end("s1") == [str(own)]
    assert not own.exists() and not own.parent.exists() and shared.exists()
    assert uploads.end("s2") == [str(shared)] and not shared.exists()
    assert uploads.end("s3") == []


class StubModel:
    """Only what building the demo page reads; these tests send no question, so nothing else is needed."""

    info, modalities, max_seq_len, cache = {}, ["vision", "audio", "point"], 64, None


def stub_app():
    pytest.importorskip("gradio", reason="the web demo needs the 'web' extra (pip install '.[web]')")
    from ibllm import web

    return web, web.build_app(web.ChatEngine(StubModel()))


def test_serve_limits_upload_size_and_sweeps_uploads(monkeypatch):
    import httpx

    from ibllm.web_uploads import SessionUploads

    web, app = stub_app()
    assert app.delete_cache == (3600, web.UPLOAD_MAX_AGE_S)
    assert isinstance(app.uploads, SessionUploads)
    monkeypatch.setattr(web, "MAX_UPLOAD_SIZE", "2kb")
    _, url = web.launch(app, port=_free_port(), quiet=True, block=False)
    try:
        def upload(n: int) -> httpx.Response:
            return httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": ("x.bin", b"\0" * n)},
                              timeout=30)

        assert upload(1000).status_code == 200
        assert upload(5000).status_code == 413
    finally:
        app.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.system
def test_browser_upload_deleted_when_tab_closes(browser, tmp_path):
    """A real page in headless Chromium: the uploaded file exists while the page is open and is deleted
    once the page is left (gradio's unload event)."""
    import time

    web, app = stub_app()
    _, url = web.launch(app, port=_free_port(), quiet=True, block=False)
    try:
        browser.get(url)
        deadline = time.monotonic() + 60
        while not browser.find_elements("css selector", "#ibllm-image input[type=file]"):
            assert time.monotonic() < deadline, "the page did not load"
            time.sleep(0.1)
        picture = tmp_path / "mine.png"
        Image.new("RGB", (8, 8), (1, 2, 3)).save(picture)
        browser.find_element("css selector", "#ibllm-image input[type=file]").send_keys(str(picture))

        def held() -> list[str]:
            return [p for paths in app.uploads.by_session.values() for p in paths]

        while not held():
            assert time.monotonic() < deadline, "the upload was not recorded"
            time.sleep(0.1)
        stored = Path(held()[0])
        assert stored.exists() and stored.read_bytes() == picture.read_bytes()
        browser.get("about:blank")  # the session ends
        deadline = time.monotonic() + 60
        while stored.exists():
            assert time.monotonic() < deadline, "the upload was not deleted when the page closed"
            time.sleep(0.2)
        assert held() == []
    finally:
        app.close()
