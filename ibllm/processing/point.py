"""Point-cloud loading for Point-Bind, with the resampling and normalisation the official loader leaves
out (it feeds clouds of any size and scale): every cloud comes out as float32 ``[num_points, 3]`` in the
unit sphere.

Bounds on the work per cloud (module constants a caller may change; ``None`` switches one off):

- :data:`MAX_POINT_FILE_BYTES` (256 MiB): larger files are refused before they are read.
- :data:`MAX_POINTS` (2,000,000): clouds with more points are refused — from the header where the format
  has one (``.npy`` shape, PLY element counts, PCD ``POINTS``), while parsing text, and after decoding.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import MediaError, check_limit, npy_shape, open_source, over_limit

MAX_POINT_FILE_BYTES: int | None = 256 * 2**20
"""Largest point-cloud file (or byte string) read."""
MAX_POINTS: int | None = 2_000_000
"""Most points (PLY: elements of any kind) in one cloud."""
_LIMIT = "ibllm.processing.point."
POINT_EXTENSIONS = (".pt", ".pth", ".npy", ".ply", ".xyz", ".pts", ".txt", ".obj", ".pcd")


class _TooMany(Exception):
    """A cloud (or a PLY element) has more than :data:`MAX_POINTS` entries."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.count = count


def _read_text_columns(text: str) -> np.ndarray:
    """Whitespace- (or comma-) separated rows; the first 3 numeric columns of rows with >= 3 fields.
    Rows with fewer fields (e.g. the point count heading some ``.pts`` files) and ``#`` comments are skipped."""
    rows = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if len(fields) >= 3:
            rows.append(fields[:3])
            if MAX_POINTS is not None and len(rows) > MAX_POINTS:
                raise _TooMany(len(rows))
    if not rows:
        return np.zeros((0, 3), np.float32)
    try:
        return np.asarray(rows, dtype=np.float64)
    except ValueError:  # a non-numeric heading row such as "x y z": drop rows that do not parse
        return np.asarray([r for r in rows if _is_numeric(r)], dtype=np.float64).reshape(-1, 3)


def _is_numeric(fields: list[str]) -> bool:
    try:
        [float(f) for f in fields]
    except ValueError:
        return False
    return True


def _read_obj(text: str) -> np.ndarray:
    rows = [line.split()[1:4] for line in text.splitlines() if line.startswith("v ")]
    if MAX_POINTS is not None and len(rows) > MAX_POINTS:
        raise _TooMany(len(rows))
    return np.asarray(rows, dtype=np.float64) if rows else np.zeros((0, 3), np.float32)


def _ply_counts(data: bytes) -> list[int]:
    """The element counts a PLY header declares (``element vertex 1000`` ...), read before parsing."""
    end = data.find(b"end_header", 0, 1 << 20)
    lines = data[: end if end >= 0 else 1 << 20].split(b"\n")
    return [int(w[2]) for w in (line.split() for line in lines) if len(w) == 3 and w[0] == b"element"
            and w[2].isdigit()]


def _read_ply(data: bytes, path: Path | None = None) -> np.ndarray:
    from plyfile import PlyData

    for count in _ply_counts(data):
        if MAX_POINTS is not None and count > MAX_POINTS:
            raise _TooMany(count)
    # plyfile memory-maps a real file but parses a byte stream far more slowly (~100x for 40k points)
    vertex = PlyData.read(str(path) if path is not None else io.BytesIO(data))["vertex"]
    return np.stack([np.asarray(vertex[c], dtype=np.float64) for c in ("x", "y", "z")], axis=1)


_PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8",
              ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}


def _read_pcd(data: bytes) -> np.ndarray:
    """PCL ``.pcd`` with ``DATA ascii`` or ``DATA binary`` (``binary_compressed`` is not supported)."""
    header: dict[str, list[str]] = {}
    pos = 0
    while True:
        end = data.index(b"\n", pos)
        line = data[pos:end].decode("ascii").strip()
        pos = end + 1
        if not line or line.startswith("#"):
            continue
        key, *vals = line.split()
        header[key.upper()] = vals
        if key.upper() == "DATA":
            break
    fields = header["FIELDS"]
    counts = [int(c) for c in header.get("COUNT", ["1"] * len(fields))]
    n = int(header["POINTS"][0])
    if MAX_POINTS is not None and n > MAX_POINTS:
        raise _TooMany(n)
    kind = header["DATA"][0].lower()
    cols = {f: i for i, f in enumerate(fields)}
    if kind == "ascii":
        arr = np.loadtxt(io.StringIO(data[pos:].decode("ascii")), ndmin=2)
        offsets = np.cumsum([0] + counts)
        return np.stack([arr[:, offsets[cols[c]]] for c in "xyz"], axis=1)
    if kind != "binary":
        raise ValueError(f"unsupported PCD DATA {kind!r}")
    dtype = np.dtype([(f, _PCD_TYPES[(t, int(s))], (c,)) for f, t, s, c in
                      zip(fields, header["TYPE"], header["SIZE"], counts)])
    rec = np.frombuffer(data, dtype=dtype, count=n, offset=pos)
    return np.stack([rec[c][:, 0].astype(np.float64) for c in "xyz"], axis=1)


def read_points(source: str | Path | bytes | Tensor | np.ndarray) -> Tensor:
    """Read a point cloud -> float32 ``[N, 3]`` (xyz only; extra columns such as colours are dropped).

    ``.pt``/``.pth`` (``torch.load(weights_only=True)`` of a tensor ``[N,>=3]`` or ``[1,N,>=3]``), ``.npy``,
    ``.ply`` (vertex x/y/z), ``.xyz``/``.pts``/``.txt`` (columns), ``.obj`` (``v`` lines), ``.pcd``
    (ascii/binary). Bytes are sniffed: PLY, PCD, NumPy, torch zip, else text columns. Files over
    :data:`MAX_POINT_FILE_BYTES` and clouds over :data:`MAX_POINTS` raise :class:`MediaError`.
    """
    if isinstance(source, (Tensor, np.ndarray)):
        arr = source.detach().cpu().numpy() if isinstance(source, Tensor) else source
        ext = ".array"
    else:
        src = open_source(source, "point", POINT_EXTENSIONS if isinstance(source, (str, Path)) else None,
                          max_bytes=MAX_POINT_FILE_BYTES, limit_name=_LIMIT + "MAX_POINT_FILE_BYTES")
        path = src if isinstance(src, Path) else None
        data = src.read_bytes() if path is not None else src.getvalue()
        ext = path.suffix.lower() if path is not None else _sniff(data)
        try:
            arr = _decode(data, ext, path)
        except _TooMany as e:
            reason = over_limit("point count", e.count, MAX_POINTS, _LIMIT + "MAX_POINTS")
            raise MediaError("point", source, str(reason)) from None
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure becomes one clear error
            raise MediaError("point", source, f"cannot read point cloud ({ext}): {e}") from e
    arr = np.asarray(arr)
    while arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise MediaError("point", source, f"expected points [N,3] (or [N,>3]), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise MediaError("point", source, "empty point cloud")
    check_limit("point", source, "point count", arr.shape[0], MAX_POINTS, _LIMIT + "MAX_POINTS")
    pts = torch.from_numpy(np.ascontiguousarray(arr[:, :3], dtype=np.float32))
    if not torch.isfinite(pts).all():
        raise MediaError("point", source, "point cloud contains NaN or Inf")
    return pts


def _sniff(data: bytes) -> str:
    if data.startswith(b"ply"):
        return ".ply"
    if data.startswith(b"\x93NUMPY"):
        return ".npy"
    if data.startswith(b"PK"):
        return ".pt"
    if b"\nDATA " in data[:4096] and (data.startswith(b"#") or data.startswith(b"VERSION")):
        return ".pcd"
    return ".obj" if b"\nv " in data[:4096] or data.startswith(b"v ") else ".xyz"


def _decode(data: bytes, ext: str, path: Path | None = None) -> np.ndarray:
    if ext in (".pt", ".pth"):
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = next((obj[k] for k in ("points", "xyz", "pc", "point") if k in obj), None)
        if not isinstance(obj, Tensor):
            raise ValueError("expected a tensor (or a dict with key 'points')")
        return obj.float().numpy()
    if ext == ".npy":
        shape = npy_shape(data)
        count = shape[-2] if shape and len(shape) >= 2 else None  # [N,3] or [1,N,3]
        if count is not None and MAX_POINTS is not None and count > MAX_POINTS:
            raise _TooMany(count)
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == ".ply":
        return _read_ply(data, path)
    if ext == ".pcd":
        return _read_pcd(data)
    text = data.decode("utf-8")
    return _read_obj(text) if ext == ".obj" else _read_text_columns(text)


def resample_points(points: Tensor, num_points: int, generator: torch.Generator | None = None) -> Tensor:
    """``[N,3]`` -> ``[num_points,3]``: unchanged when ``N == num_points``; a random subset without
    replacement (original order kept) when larger; all points plus random repeats when smaller."""
    n = points.shape[0]
    if n == num_points:
        return points
    if n > num_points:
        idx = torch.randperm(n, generator=generator)[:num_points].sort().values
    else:
        extra = torch.randint(0, n, (num_points - n,), generator=generator)
        idx = torch.cat([torch.arange(n), extra])
    return points[idx]


def normalize_points(points: Tensor) -> Tensor:
    """Centre ``[N,3]`` at its mean and scale so the largest point norm is 1 (a single point -> origin).

    Idempotent up to float rounding on clouds that are already centred and unit-scaled."""
    centred = points - points.mean(dim=0, keepdim=True)
    radius = centred.norm(dim=1).max()
    return centred / radius if radius > 0 else centred


def load_point_cloud(
    source: str | Path | bytes | Tensor | np.ndarray,
    num_points: int = 8192,
    normalize: bool = True,
    seed: int | None = 0,
) -> Tensor:
    """Point-Bind input: file/bytes/array -> float32 ``[num_points, 3]``, centred and in the unit sphere.

    Resampling (:func:`resample_points`) draws from a generator seeded with ``seed`` (``None``: the global
    RNG), so the same file gives the same points. Normalisation happens after resampling.
    Empty clouds, unreadable files and unknown extensions raise :class:`MediaError`.
    """
    pts = read_points(source)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    pts = resample_points(pts, num_points, gen)
    return normalize_points(pts) if normalize else pts
