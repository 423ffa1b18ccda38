"""Depth, thermal and IMU loaders. The official ImageBind-LLM code ships none; the model only fixes the
shapes (depth/thermal ``[1,224,224]``, IMU ``[6,2000]``), so the value conventions here are this
project's choice, documented per function.

Bounds on the work per input (module constants a caller may change; ``None`` switches one off):

- :data:`MAX_SENSOR_FILE_BYTES` (256 MiB): larger files are refused before they are read.
- :data:`MAX_SENSOR_ELEMENTS` (2**24, e.g. a 4096 x 4096 map or 2.8 million IMU samples): larger arrays
  and images are refused — from the ``.npy`` header or the image header before decoding, else after loading.
- :data:`MAX_ASPECT_RATIO` (100): depth/thermal maps more elongated than this are centre-cropped to the
  ratio before the short-side resize; maps within the ratio are processed exactly as before.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .errors import MediaError, central_span, check_limit, npy_shape, open_source
from .image import check_declared_size

ARRAY_EXTENSIONS = (".npy", ".pt", ".pth")
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".webp")
Source = str | Path | bytes | Tensor | np.ndarray
MAX_SENSOR_FILE_BYTES: int | None = 256 * 2**20
"""Largest depth/thermal/IMU file (or byte string) read."""
MAX_SENSOR_ELEMENTS: int | None = 2**24
"""Most values in one depth/thermal map (pixels) or IMU recording (channels x samples)."""
MAX_ASPECT_RATIO: float | None = 100.0
"""Long side / short side above which depth/thermal maps are centre-cropped before resizing."""
_LIMIT = "ibllm.processing.sensors."


def _check_elements(source: Source, modality: str, shape: tuple[int, ...]) -> None:
    check_limit(modality, source, f"array of shape {tuple(shape)}: element count", int(np.prod(shape)),
                MAX_SENSOR_ELEMENTS, _LIMIT + "MAX_SENSOR_ELEMENTS")


def _load_array(source: Source, modality: str, extensions: tuple[str, ...]) -> tuple[np.ndarray, str]:
    """Read an array or single-channel image -> (2-D or higher ndarray, kind) with kind one of
    ``"float"`` (arrays), ``"uint8"`` (8-bit images), ``"int"`` (16/32-bit integer images). Files over
    :data:`MAX_SENSOR_FILE_BYTES` and arrays/images over :data:`MAX_SENSOR_ELEMENTS` raise :class:`MediaError`."""
    if isinstance(source, (Tensor, np.ndarray)):
        _check_elements(source, modality, tuple(source.shape))
        if isinstance(source, Tensor):
            return source.detach().cpu().float().numpy(), "float"
        return source, "float"
    src = open_source(source, modality, extensions if isinstance(source, (str, Path)) else None,
                      max_bytes=MAX_SENSOR_FILE_BYTES, limit_name=_LIMIT + "MAX_SENSOR_FILE_BYTES")
    data = src.read_bytes() if isinstance(src, Path) else src.getvalue()
    ext = src.suffix.lower() if isinstance(src, Path) else ""
    try:
        if ext == ".npy" or data.startswith(b"\x93NUMPY"):
            shape = npy_shape(data)
            if shape is not None:
                _check_elements(source, modality, shape)
            return _checked(np.load(io.BytesIO(data), allow_pickle=False), source, modality), "float"
        if ext in (".pt", ".pth") or data.startswith(b"PK"):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(obj, Tensor):
                raise ValueError("expected a tensor")
            _check_elements(source, modality, tuple(obj.shape))
            return obj.float().numpy(), "float"
        if ext in (".csv", ".txt"):
            arr = np.loadtxt(io.StringIO(data.decode("utf-8")), delimiter="," if b"," in data else None, ndmin=2)
            return _checked(arr, source, modality), "float"
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        check_declared_size(img, source, modality, MAX_SENSOR_ELEMENTS, _LIMIT + "MAX_SENSOR_ELEMENTS")
        img.load()
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes one clear error
        raise MediaError(modality, source, f"cannot decode {modality} file: {e}") from e
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return np.asarray(img), "float" if img.mode == "F" else "int"
    return np.asarray(img.convert("L")), "uint8"


def _checked(arr: np.ndarray, source: Source, modality: str) -> np.ndarray:
    _check_elements(source, modality, arr.shape)
    return arr


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
    """``[H, W]`` -> ``[1, size, size]``: antialiased bilinear resize of the short side to ``size``, centre crop.

    A map more elongated than :data:`MAX_ASPECT_RATIO` is centre-cropped to that ratio first."""
    h, w = x.shape
    span = central_span(max(h, w), min(h, w), MAX_ASPECT_RATIO)
    if span is not None:
        start, length = span
        x = x[:, start: start + length] if w > h else x[start: start + length]
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
