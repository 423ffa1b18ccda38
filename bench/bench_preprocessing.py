"""Per-modality preprocessing throughput on CPU (files/s, one process). Not a test: it prints figures.

    python bench/bench_preprocessing.py [--seconds 2] [--threads 1]

Writes synthetic media of typical sizes to a temp dir, then times each loader on it for about
``--seconds`` (after one warm-up call). ``--threads`` defaults to 1, as in a DataLoader worker: on a
busy machine, torch's intra-op threads for these small tensors cost far more than they gain.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
from PIL import Image
from plyfile import PlyData, PlyElement

from ibllm.processing import (load_audio, load_depth, load_image, load_imu, load_point_cloud, load_thermal,
                              load_video, tokenize)


def make_media(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    f = {}
    f["jpeg"] = root / "img.jpg"
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(f["jpeg"], quality=90)
    f["video"] = root / "clip.mp4"
    with av.open(str(f["video"]), "w") as c:
        s = c.add_stream("mpeg4", rate=30)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        for i in range(300):  # 10 s
            arr = np.full((240, 320, 3), i % 256, np.uint8)
            arr[:, (i * 3) % 320:] //= 2
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    f["video60"] = root / "long.mp4"
    with av.open(str(f["video60"]), "w") as c:
        s = c.add_stream("mpeg4", rate=30)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        base = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        for i in range(1800):  # 60 s of textured frames
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    t = np.arange(10 * 44100) / 44100
    f["wav44k"] = root / "a44.wav"
    sf.write(f["wav44k"], np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1) * 0.3, 44100)
    f["wav16k"] = root / "a16.wav"
    sf.write(f["wav16k"], rng.normal(0, 0.1, 10 * 16000), 16000)
    pts = rng.normal(size=(40000, 3)).astype(np.float32)
    f["npy"] = root / "pc.npy"
    np.save(f["npy"], pts)
    f["ply"] = root / "pc.ply"
    v = np.zeros(len(pts), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    v["x"], v["y"], v["z"] = pts.T
    PlyData([PlyElement.describe(v, "vertex")]).write(str(f["ply"]))
    f["depth"] = root / "d.png"
    Image.fromarray(rng.integers(500, 5000, (480, 640), dtype=np.uint16)).save(f["depth"])
    f["thermal"] = root / "t.jpg"
    Image.fromarray(rng.integers(0, 256, (512, 640), dtype=np.uint8)).save(f["thermal"])
    f["imu"] = root / "imu.npy"
    np.save(f["imu"], rng.normal(size=(6, 2400)).astype(np.float32))
    return f


def rate(fn, seconds: float) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 3:
        fn()
        n += 1
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    captions = [f"a photo of {i} small dogs playing in the park near the river, number {i}" for i in range(64)]
    with tempfile.TemporaryDirectory() as d:
        f = make_media(Path(d))
        cases = [
            ("image eval (640x480 JPEG)", lambda: load_image(f["jpeg"])),
            ("image train (640x480 JPEG)", lambda: load_image(f["jpeg"], train=True)),
            ("video (10 s, 320x240, 30 fps mpeg4)", lambda: load_video(f["video"])),
            ("video (60 s, 320x240, 30 fps mpeg4, textured)", lambda: load_video(f["video60"])),
            ("audio (10 s, 16 kHz mono WAV)", lambda: load_audio(f["wav16k"])),
            ("audio (10 s, 44.1 kHz stereo WAV, resampled)", lambda: load_audio(f["wav44k"])),
            ("text (batch of 64 captions, per caption)", lambda: tokenize(captions)),
            ("point (.npy, 40k pts -> 8192)", lambda: load_point_cloud(f["npy"])),
            ("point (.ply, 40k pts -> 8192)", lambda: load_point_cloud(f["ply"])),
            ("depth (640x480 16-bit PNG)", lambda: load_depth(f["depth"])),
            ("thermal (640x512 JPEG)", lambda: load_thermal(f["thermal"])),
            ("imu (.npy 6x2400)", lambda: load_imu(f["imu"])),
        ]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
        for name, fn in cases:
            r = rate(fn, args.seconds)
            if name.startswith("text"):
                r *= len(captions)
            print(f"{name:48s} {r:10.1f} files/s  ({1000 / r:7.2f} ms each)")


if __name__ == "__main__":
    main()
