"""Benchmark the ImageBind / Point-Bind encoders on CPU (prints figures; not a test).

Usage: ``python bench/bench_encoders.py [--batch 8] [--seconds 1.0] [--threads 1] [--presets tiny demo]``.
Reports forward samples/s per modality (eval, ``torch.inference_mode``), the full-size Point-Bind encoder
(8192 points, batch 2), and the parameter memory of ``huge`` built on the meta device (vision only vs. all
modalities, with and without Point-Bind).
"""

from __future__ import annotations

import argparse
import time

import torch

from ibllm.config import imagebind_preset
from ibllm.models.imagebind import build_imagebind, imagebind_summary


def sample_inputs(name: str, preset: str, batch: int) -> torch.Tensor:
    """A random batch for modality ``name`` shaped as the preset expects."""
    cfg = imagebind_preset(preset)
    if name == "vision":
        return torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    if name == "text":
        text = torch.randint(1, 49000, (batch, cfg.text_context))
        text[:, 20] = cfg.text_vocab_size - 1
        return text
    if name == "audio":
        return torch.randn(batch, 1, cfg.audio_mel_bins, cfg.audio_target_len)
    if name in ("depth", "thermal"):
        return torch.randn(batch, 1, cfg.image_size, cfg.image_size)
    if name == "imu":
        return torch.randn(batch, cfg.imu_channels, cfg.imu_length)
    assert cfg.point is not None
    return torch.rand(batch, cfg.point.npoints, 3) * 2 - 1


def time_modality(model: torch.nn.Module, name: str, x: torch.Tensor, seconds: float) -> tuple[float, float]:
    """``(median, best)`` samples/s of ``model({name: x})`` over >= 3 timed calls and >= ``seconds``.

    The best call is the least disturbed by other processes on a shared CPU; the median is typical.
    """
    times: list[float] = []
    with torch.inference_mode():
        model({name: x}, point_seed=0)  # warm-up
        while len(times) < 3 or sum(times) < seconds:
            start = time.perf_counter()
            model({name: x}, point_seed=0)
            times.append(time.perf_counter() - start)
    times.sort()
    return x.shape[0] / times[len(times) // 2], x.shape[0] / times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--presets", nargs="+", default=["tiny", "demo"])
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1 is the most stable on a shared CPU)")
    parser.add_argument("--skip-huge-point", action="store_true",
                        help="skip the full-size Point-Bind encoder (8192 points, 512 groups; ~2 s a call)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, fp32, CPU")
    for preset in args.presets:
        torch.manual_seed(0)
        model = build_imagebind(preset)
        params = sum(p.numel() for p in model.parameters())
        print(f"\n[{preset}] {params / 1e6:.2f} M parameters, modalities {', '.join(model.modalities)}")
        for name in model.modalities:
            x = sample_inputs(name, preset, args.batch)
            median, best = time_modality(model, name, x, args.seconds)
            print(f"  {name:8s} input {str(tuple(x.shape)):24s} {median:8.1f} samples/s (median)  "
                  f"{best:8.1f} (best)")
    if not args.skip_huge_point:
        torch.manual_seed(0)
        model = build_imagebind("huge_w3d", ["point"])
        x = sample_inputs("point", "huge_w3d", 2)
        median, best = time_modality(model, "point", x, 0.0)
        print(f"\n[huge_w3d] point    input {str(tuple(x.shape)):24s} {median:8.2f} samples/s (median)  "
              f"{best:8.2f} (best)")
    print("\n[huge] parameter memory (meta-device estimate)")
    for preset, modalities in (("huge", ["vision"]), ("huge", None), ("huge_w3d", None), ("huge_w3d", ["point"])):
        s = imagebind_summary(preset, modalities)
        gib = s["fp32_bytes"] / 2**30
        label = f"{preset} {'+'.join(s['modalities']) if modalities else 'all'}"
        print(f"  {label:28s} {s['total_params'] / 1e6:9.1f} M params  {s['num_keys']:5d} keys  "
              f"fp32 {gib:6.2f} GiB  bf16 {gib / 2:6.2f} GiB")


if __name__ == "__main__":
    main()
