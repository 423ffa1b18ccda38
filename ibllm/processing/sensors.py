"""Depth, thermal and IMU loaders (SPEC §5.6). The official ImageBind-LLM code ships none; the model
only fixes the shapes (depth/thermal ``[1,224,224]``, IMU ``[6,2000]``), so the value conventions here
are this project's choice, documented per function.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .errors import MediaError, open_source

ARRAY_EXTENSIONS = (".npy", ".pt", ".pth")
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".webp")
Source = str | Path | bytes | Tensor | np.ndarray


def _load_array(source: Source, modality: str, extensions: tuple[str, ...]) -> tuple[np.ndarray, str]:
    """Read an array or single-channel image -> (2-D or higher ndarray, kind) with kind one of
    ``"float"`` (arrays), ``"uint8"`` (8-bit images), ``"int"`` (16/32-bit integer images)."""
    if isinstance(source, Tensor):
        return source.detach().cpu().float().numpy(), "float"
    if isinstance(source, np.ndarray):
        return source, "float"
    src = open_source(source, modality, extensions if isinstance(source, (str, Path)) else None)
    data = src.read_bytes() if isinstance(src, Path) else src.getvalue()
    ext = src.suffix.lower() if isinstance(src, Path) else ""
    try:
        if ext == ".npy" or data.startswith(b"\x93NUMPY"):
            return np.load(io.BytesIO(data), allow_pickle=False), "float"
        if ext in (".pt", ".pth") or data.startswith(b"PK"):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(obj, Tensor):
                raise ValueError("expected a tensor")
            return obj.float().numpy(), "float"
        if ext in (".csv", ".txt"):
            return np.loadtxt(io.StringIO(data.decode("utf-8")), delimiter="," if b"," in data else None,
                              ndmin=2), "float"
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes one clear error
        raise MediaError(modality, source, f"cannot decode {modality} file: {e}") from e
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return np.asarray(img), "float" if img.mode == "F" else "int"
    return np.asarray(img.convert("L")), "uint8"


def _to_map(arr: np.ndarray, source: Source, modality: str) -> Tensor:
    """Squeeze to ``[H, W]`` float32 (a trailing/leading channel axis of size 1, or RGB averaged)."""
    a = np.asarray(arr, dtype=np.float32)
    a = np.squeeze(a)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a[..., :3].mean(-1)
    elif a.ndim == 3 and a.shape[0] in (3, 4):
        a = a[:3].mean(0)
    if a.ndim != 2 or min(a.shape) == 0:
        raise MediaError(modality, source, f"expected a 2-D map, got shape {tuple(np.shape(arr))}")
    return torch.from_numpy(np.ascontiguousarray(a))


def resize_center_crop(x: Tensor, size: int) -> Tensor:
    """``[H, W]`` -> ``[1, size, size]``: antialiased bilinear resize of the short side to ``size``, centre crop."""
    h, w = x.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    y = F.interpolate(x[None, None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return y[:, top: top + size, left: left + size].contiguous()


def load_depth(source: Source, size: int = 224, depth_scale: float = 1000.0, kind: str | None = None) -> Tensor:
    """Depth map -> normalised disparity ``[1, size, size]`` in [0, 1] (1 = nearest valid point).

    Input conventions (``kind=None`` picks by file type):
    - ``"depth"``: metric depth. Float arrays (``.npy``/``.pt``/tensor, float TIFF) are metres; 16-bit
      images are ``value / depth_scale`` metres (default 1000: millimetres, the NYUv2 / SUN RGB-D format).
    - ``"disparity"``: already inverse depth (the default for 8-bit images, e.g. saved MiDaS/DPT output).
    Depth becomes disparity ``1 / depth`` (ImageBind was trained on disparity for scale invariance), invalid
    pixels (<= 0, NaN, Inf) become 0, and the map is divided by its maximum so the result is scale-free.
    An all-invalid map stays 0. Then short-side resize to ``size`` and centre crop.
    """
    arr, dtype_kind = _load_array(source, "depth", ARRAY_EXTENSIONS + IMAGE_EXTENSIONS)
    x = _to_map(arr, source, "depth").double()
    if kind is None:
        kind = "disparity" if dtype_kind == "uint8" else "depth"
    if kind not in ("depth", "disparity"):
        raise ValueError(f"kind must be 'depth' or 'disparity', got {kind!r}")
    if dtype_kind == "int" and kind == "depth":
        x = x / depth_scale
    valid = torch.isfinite(x) & (x > 0)
    if kind == "depth":
        x = torch.where(valid, 1.0 / torch.where(valid, x, 1.0), 0.0)
    else:
        x = torch.where(valid, x, 0.0)
    peak = x.max()
    if peak > 0:
        x = x / peak
    return resize_center_crop(x.float(), size)


def load_thermal(source: Source, size: int = 224) -> Tensor:
    """Thermal image -> ``[1, size, size]`` intensity in [0, 1] (no mean/std normalisation).

    8-bit images (the LLVIP format ImageBind used) are ``value / 255``. 16-bit radiometric images and
    float arrays outside [0, 1] are min-max scaled per image (their offset is camera-specific); float arrays
    already in [0, 1] are kept. RGB-encoded thermal images are averaged to one channel. Then short-side
    resize to ``size`` and centre crop.
    """
    arr, dtype_kind = _load_array(source, "thermal", ARRAY_EXTENSIONS + IMAGE_EXTENSIONS)
    x = _to_map(arr, source, "thermal").double()
    if not torch.isfinite(x).all():
        raise MediaError("thermal", source, "thermal map contains NaN or Inf")
    if dtype_kind == "uint8":
        x = x / 255.0
    elif x.min() < 0 or x.max() > 1:
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    return resize_center_crop(x.float(), size)


def load_imu(source: Source, length: int = 2000) -> Tensor:
    """IMU recording -> float32 ``[6, length]`` (accelerometer xyz, gyroscope xyz by convention).

    Accepts ``.npy``/``.pt``/tensor/``.csv``/``.txt`` holding ``[6, T]`` or ``[T, 6]`` (transposed when the
    first axis is not 6). Longer recordings keep the first ``length`` samples; shorter ones are zero-padded
    at the end. No rescaling (ImageBind's Ego4D IMU is fed in sensor units).
    """
    arr, _ = _load_array(source, "imu", ARRAY_EXTENSIONS + (".csv", ".txt"))
    a = np.squeeze(np.asarray(arr, dtype=np.float32))
    if a.ndim == 2 and a.shape[0] != 6 and a.shape[1] == 6:
        a = a.T
    if a.ndim != 2 or a.shape[0] != 6 or a.shape[1] == 0:
        raise MediaError("imu", source, f"expected IMU data [6,T] or [T,6], got shape {tuple(np.shape(arr))}")
    if not np.isfinite(a).all():
        raise MediaError("imu", source, "IMU data contains NaN or Inf")
    x = torch.from_numpy(np.ascontiguousarray(a[:, :length]))
    return F.pad(x, (0, length - x.shape[1]))
