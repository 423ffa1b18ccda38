"""The visual cache: a FAISS index of ImageBind image embeddings that enhances non-image queries.

At inference a (non-image) query embedding retrieves its top-k cached image embeddings, whose
softmax-weighted average is blended into the query before the bind network::

    s, ids = index.search(v, k)                 # one call for the whole batch
    P      = values[ids]                        # [B,k,C], one vectorised gather
    c      = normalize(softmax(t * s) @ P)
    v'     = normalize((1 - w) * v + w * c)     # v: the un-renormalised modality mix

with ``k = 10`` neighbours, temperature ``t = 20`` and weight ``w = 0.5`` by default (the settings of the
released ImageBind-LLM demo). This module holds the cache as it is used:

* :class:`VisualCache` — ``enhance(query [B,C]) -> [B,C]`` (what ``ImageBindLLM.encode(..., cache=)``
  calls), plus ``search`` / ``gather`` / ``neighbours`` for analysis (e.g. cross-modal retrieval).
  Values come either from a float16/float32 ``.npy`` memory map kept beside the index, or from the
  index itself (``reconstruct_batch``; IVF indexes get a direct map).
* :func:`load_cache` — reads a cache folder (``knn.index``, ``ids.txt``, optional ``values.npy`` and
  ``cache.json``), or a bare FAISS index made elsewhere (the official ``knn.index``) as long as it scores
  by inner product and can reconstruct its vectors. A missing, corrupt or dimension-mismatched index is
  one :class:`CacheError` naming the file.

Choosing, building and saving an index is :mod:`ibllm.cache_build.index`; building one from image shards
over ranks is :mod:`ibllm.cache_build`. GPU FAISS is used when the ``gpu`` extra is installed and a GPU
is present (``faiss.get_num_gpus()``); CPU otherwise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

INDEX_FILE = "knn.index"
META_FILE = "cache.json"
IDS_FILE = "ids.txt"
VALUES_FILE = "values.npy"
FORMAT = "ibllm-visual-cache"
FORMAT_VERSION = 1
_NORM_EPS = 1e-12


class CacheError(ValueError):
    """A visual cache that cannot be used (missing, corrupt, wrong dimension, cannot reconstruct)."""


def faiss_module() -> Any:
    """The ``faiss`` module (imported on first use: it is large), or an ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a core dependency via the cpu/gpu extra
        raise ImportError("the visual cache needs FAISS: pip install 'ibllm[cpu]' (or [gpu])") from e
    return faiss


def gpu_available() -> bool:
    """True when the installed FAISS has GPU support and sees at least one GPU."""
    faiss = faiss_module()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def set_search_param(index: Any, name: str, value: int) -> None:
    """Set a FAISS search parameter (``nprobe``, ``efSearch``) on a CPU or GPU index."""
    faiss = faiss_module()
    if "Gpu" in type(index).__name__:
        faiss.GpuParameterSpace().set_index_parameter(index, name, value)
    else:
        faiss.ParameterSpace().set_index_parameter(index, name, value)


def to_gpu(index: Any) -> Any:
    """A float16 clone of ``index`` spread over every GPU."""
    faiss = faiss_module()
    opts = faiss.GpuMultipleClonerOptions()
    opts.useFloat16 = True
    return faiss.index_cpu_to_all_gpus(index, opts)


class VisualCache:
    """Cache-enhanced encoding over a FAISS inner-product index.

    Args:
        index: a FAISS index (inner product) that can ``search``; also ``reconstruct`` unless ``values``.
        values: optional ``[N,C]`` array (a float16/float32 ``.npy`` memory map) of the stored vectors,
            row ``i`` = FAISS id ``i``; gathered instead of reconstructing from the index.
        ids: optional sequence of ``N`` sample ids (``shard:key``) for :meth:`neighbours`.
        k / temperature / weight: neighbours per query, softmax temperature over their scores, and the
            share of the neighbours' average in the blended embedding.
        path: where the index was read from (named in errors).
        meta: the cache's metadata (``cache.json``), empty for a bare index.
        search_index: optional second index used for ``search`` only (a GPU clone).
    """

    def __init__(self, index: Any, values: np.ndarray | None = None, ids: Sequence[str] | None = None,
                 k: int = 10, temperature: float = 20.0, weight: float = 0.5, path: str | Path | None = None,
                 meta: dict[str, Any] | None = None, search_index: Any = None) -> None:
        self.index = index
        self.search_index = search_index if search_index is not None else index
        self.values = values
        self.ids = ids
        self.path = str(path) if path is not None else "<in-memory index>"
        self.meta = dict(meta or {})
        self.k, self.temperature, self.weight = k, temperature, weight
        if values is not None and tuple(values.shape) != (index.ntotal, index.d):
            raise CacheError(f"{self.path}: values have shape {tuple(values.shape)}, the index holds "
                             f"{index.ntotal} vectors of dimension {index.d}")
        if ids is not None and len(ids) != index.ntotal:
            raise CacheError(f"{self.path}: {len(ids)} ids for {index.ntotal} indexed vectors")

    # the neighbour count is settable (validated); temperature and weight are plain attributes
    @property
    def k(self) -> int:
        """Number of neighbours retrieved per query (``cache_size``)."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        if int(value) < 1:
            raise ValueError(f"cache k must be at least 1, got {value}")
        self._k = int(value)

    @property
    def dim(self) -> int:
        """Embedding width of the index."""
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        return (f"VisualCache({self.path!r}, n={len(self)}, dim={self.dim}, k={self.k}, "
                f"temperature={self.temperature}, weight={self.weight}, "
                f"values={'memmap' if self.values is not None else 'reconstruct'})")

    def _check(self, query: np.ndarray) -> np.ndarray:
        if query.ndim != 2 or query.shape[1] != self.dim:
            raise CacheError(f"{self.path}: the index holds {self.dim}-d vectors, the query is "
                             f"{tuple(query.shape)} (expected [B,{self.dim}]); was it built with another encoder?")
        return np.ascontiguousarray(query, dtype=np.float32)

    def search(self, query: np.ndarray | Tensor, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner-product scores and FAISS ids ``[B,k]`` for a batch, in ONE index call (ids -1 = none)."""
        if isinstance(query, Tensor):
            query = query.detach().float().cpu().numpy()
        return self.search_index.search(self._check(query), int(k or self.k))

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors ``[*ids.shape, C]`` (float32) of FAISS ids, in ONE vectorised gather; ids ``-1`` give zeros."""
        flat = np.asarray(ids, dtype=np.int64).reshape(-1)
        safe = np.where(flat < 0, 0, flat)
        if self.values is not None:
            order = np.argsort(safe, kind="stable")  # sorted reads are kinder to a memory map
            rows = np.empty((len(safe), self.dim), dtype=np.float32)
            rows[order] = self.values[safe[order]]
        else:
            rows = np.asarray(self.index.reconstruct_batch(safe), dtype=np.float32).reshape(len(safe), self.dim)
        rows[flat < 0] = 0.0
        return rows.reshape(*np.shape(ids), self.dim)

    def neighbours(self, query: np.ndarray | Tensor, k: int | None = None) -> list[list[tuple[str | int, float]]]:
        """``(sample id, score)`` of each query's top-``k`` cached images (FAISS ids when no ids are stored)."""
        scores, idx = self.search(query, k)
        name = (lambda i: self.ids[i]) if self.ids is not None else int
        return [[(name(i), float(s)) for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, idx)]

    @torch.no_grad()
    def enhance(self, query: Tensor) -> Tensor:
        """The ``[B,C]`` modality mix (before renormalisation) -> cache-enhanced, L2-normalised ``[B,C]``.

        Same device and dtype as ``query``; the arithmetic is float32 on the CPU (where FAISS answers).
        """
        if query.ndim != 2:
            raise CacheError(f"{self.path}: enhance expects a [B,C] batch, got shape {tuple(query.shape)}")
        v = query.detach().float().cpu()
        scores, ids = self.search(v.numpy())
        values = torch.from_numpy(self.gather(ids))  # [B,k,C]
        logits = self.temperature * torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
        logits = logits.masked_fill(torch.from_numpy(ids < 0), float("-inf"))
        attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no neighbour at all -> zeros
        c = F.normalize(torch.einsum("bk,bkc->bc", attn, values), dim=-1, eps=_NORM_EPS)
        out = F.normalize((1.0 - self.weight) * v + self.weight * c, dim=-1, eps=_NORM_EPS)
        return out.to(device=query.device, dtype=query.dtype)


def _read_index(file: Path) -> Any:
    faiss = faiss_module()
    if not file.is_file():
        raise CacheError(f"visual cache index {file}: no such file")
    try:
        return faiss.read_index(str(file))
    except Exception as e:  # noqa: BLE001 - FAISS raises RuntimeError with a C++ trace
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CacheError(f"visual cache index {file}: not a readable FAISS index ({first[:200]})") from None


def _ensure_reconstruct(index: Any, file: Path) -> None:
    """Make ``index.reconstruct`` work (IVF: add a direct map) or raise naming ``file``."""
    faiss = faiss_module()
    try:
        index.reconstruct(0)
        return
    except RuntimeError:
        pass
    try:
        faiss.extract_index_ivf(index).make_direct_map()
        index.reconstruct(0)
    except Exception:  # noqa: BLE001
        raise CacheError(f"visual cache index {file}: a {type(index).__name__} that cannot reconstruct its "
                         f"vectors and no {VALUES_FILE} beside it; the cache needs one of the two") from None


def load_cache(path: str | Path, k: int = 10, temperature: float = 20.0, weight: float = 0.5,
               dim: int | None = None, search_params: dict[str, int] | None = None,
               use_gpu: bool | None = None) -> VisualCache:
    """Load a visual cache: a folder with ``cache.json``, that JSON file, or a bare FAISS index file.

    A bare index (e.g. the official ``knn.index``, or a folder holding only ``knn.index``) must score
    by inner product and reconstruct its vectors (IVF indexes get a direct map on load). ``dim`` is the
    embedding width expected by the encoder (checked). ``search_params`` (``{"nprobe": 32}``) override
    the tuned ones. With GPU FAISS (``use_gpu`` None = when available) searches run on a GPU clone;
    values still come from the CPU index or the memory map. Any problem is one :class:`CacheError`
    naming the file.
    """
    faiss = faiss_module()
    p = Path(path)
    if not p.exists():
        raise CacheError(f"visual cache {p}: no such file or directory")
    meta: dict[str, Any] = {}
    meta_file = p / META_FILE if p.is_dir() else (p if p.suffix == ".json" else None)
    if meta_file is not None and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"visual cache metadata {meta_file}: not readable JSON ({e})") from None
        if meta.get("format") != FORMAT:
            raise CacheError(f"visual cache metadata {meta_file}: not an {FORMAT} file")
        root = meta_file.parent
        index_file = root / meta.get("index_file", INDEX_FILE)
    elif p.is_dir():
        root, index_file = p, p / INDEX_FILE
        if not index_file.exists():
            raise CacheError(f"visual cache {p}: neither {META_FILE} nor {INDEX_FILE} in this folder")
    else:
        root, index_file = p.parent, p
    index = _read_index(index_file)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise CacheError(f"visual cache index {index_file}: metric {index.metric_type} is not inner product "
                         f"(the cache needs similarity scores, larger = closer)")
    if index.ntotal < 1:
        raise CacheError(f"visual cache index {index_file}: the index is empty")
    if dim is not None and index.d != dim:
        raise CacheError(f"visual cache index {index_file}: holds {index.d}-d vectors, the encoder gives {dim}-d")
    for key, expected in (("dim", index.d), ("count", index.ntotal)):
        if key in meta and meta[key] != expected:
            raise CacheError(f"visual cache index {index_file}: {key} {expected} differs from {meta_file}'s {meta[key]}")
    values = None
    if meta.get("values_file"):
        vfile = root / meta["values_file"]
        try:
            values = np.load(vfile, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CacheError(f"visual cache values {vfile}: not readable ({e})") from None
        if values.shape != (index.ntotal, index.d):
            raise CacheError(f"visual cache values {vfile}: shape {values.shape}, the index holds "
                             f"{index.ntotal} x {index.d}")
    else:
        _ensure_reconstruct(index, index_file)
    ids = None
    if meta.get("ids_file"):
        ids_file = root / meta["ids_file"]
        try:
            ids = ids_file.read_text().splitlines()
        except OSError as e:
            raise CacheError(f"visual cache ids {ids_file}: not readable ({e})") from None
        if len(ids) != index.ntotal:
            raise CacheError(f"visual cache ids {ids_file}: {len(ids)} ids for {index.ntotal} vectors")
    params = {**meta.get("search_params", {}), **(search_params or {})}
    for name, value in params.items():
        set_search_param(index, name, int(value))
    search_index = None
    if (gpu_available() if use_gpu is None else use_gpu) and "HNSW" not in type(index).__name__:
        try:
            search_index = to_gpu(index)
            for name, value in params.items():
                set_search_param(search_index, name, int(value))
        except Exception as e:  # noqa: BLE001
            log.warning("visual cache: searching on CPU (GPU FAISS refused the index: %s)", e)
            search_index = None
    return VisualCache(index, values, ids, k, temperature, weight, index_file, meta, search_index)
