"""Choosing, building and saving the FAISS index of a visual cache (:mod:`ibllm.cache` loads and uses it).

* :func:`choose_index` — autofaiss-style choice by size and memory budget: exact inner product for
  small sets, IVF-Flat when the vectors fit the budget, IVF-PQ when they do not, HNSW on request.
* :func:`build_index` — trains and fills the index from ``[N,C]`` embeddings (a memory map is read in
  chunks), tunes ``nprobe`` / ``efSearch`` on held-out queries for a recall target, and with ``out``
  writes a cache folder: ``knn.index``, ``ids.txt``, optional ``values.npy`` and ``cache.json``
  (embedding model hash, count, dim, metric, index type, search parameters, recall).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ibllm.atomic import atomic_write
from ibllm.cache import (FORMAT, FORMAT_VERSION, IDS_FILE, INDEX_FILE, META_FILE, VALUES_FILE, CacheError,
                         VisualCache, faiss_module, gpu_available, load_cache, set_search_param, to_gpu)

log = logging.getLogger(__name__)

ADD_CHUNK = 65536


@dataclass
class IndexChoice:
    """What :func:`choose_index` picked: ``kind`` (flat, ivf, ivfpq, hnsw), the FAISS factory string, why."""

    kind: str
    factory: str
    nlist: int = 0
    pq_m: int = 0
    estimated_bytes: int = 0
    reason: str = ""

    @property
    def exact_values(self) -> bool:
        """Whether the index reconstructs the stored vectors exactly (PQ does not)."""
        return self.kind != "ivfpq"


def _nlist_for(n: int) -> int:
    """Inverted lists: the power of two nearest sqrt(n), at most n/39 (FAISS's k-means minimum), 16..65536."""
    target = 2 ** round(math.log2(max(math.sqrt(n), 1)))
    return int(max(16, min(65536, target, 2 ** int(math.log2(max(n // 39, 16))))))


def choose_index(n: int, dim: int, memory_budget: int | None = None, index_type: str = "auto",
                 exact_max: int = 50_000, hnsw_m: int = 32) -> IndexChoice:
    """Pick an index for ``n`` vectors of width ``dim`` within ``memory_budget`` bytes (None = unlimited).

    ``auto``: exact inner product (``Flat``) for at most ``exact_max`` vectors that fit the budget;
    ``IVF{nlist},Flat`` when the raw vectors fit; ``IVF{nlist},PQ{m}`` with the largest code size that
    fits otherwise. ``flat`` / ``ivf`` / ``ivfpq`` / ``hnsw`` force a kind (HNSW keeps the raw vectors
    plus a graph: the fastest CPU search at high recall, but slow to build and not on GPU).
    """
    if n < 1 or dim < 1:
        raise CacheError(f"cannot index {n} vectors of dimension {dim}")
    flat_bytes = n * dim * 4
    nlist = _nlist_for(n)
    ivf_bytes = flat_bytes + n * 16 + nlist * dim * 4  # vectors + list ids + direct map + centroids
    hnsw_bytes = flat_bytes + n * hnsw_m * 2 * 4 * 1.1
    fits = lambda b: memory_budget is None or b <= memory_budget  # noqa: E731
    if index_type not in ("auto", "flat", "ivf", "ivfpq", "hnsw"):
        raise ValueError(f"index type must be auto, flat, ivf, ivfpq or hnsw; got {index_type!r}")
    if index_type == "flat" or index_type == "auto" and (n <= exact_max or n < 39 * 16) and fits(flat_bytes):
        return IndexChoice("flat", "Flat", estimated_bytes=flat_bytes,
                           reason=f"{n} vectors <= {exact_max}: exact inner product")
    if index_type == "hnsw":
        return IndexChoice("hnsw", f"HNSW{hnsw_m},Flat", estimated_bytes=int(hnsw_bytes), reason="requested")
    if index_type == "ivf" or index_type == "auto" and fits(ivf_bytes):
        return IndexChoice("ivf", f"IVF{nlist},Flat", nlist=nlist, estimated_bytes=ivf_bytes,
                           reason=f"{flat_bytes / 2**30:.2f} GiB of vectors fit the budget")
    candidates = [m for m in (256, 128, 96, 64, 48, 32, 16, 8, 4) if dim % m == 0]
    for m in candidates:
        pq_bytes = n * (m + 16) + nlist * dim * 4 + 256 * dim * 4
        if fits(pq_bytes) or index_type == "ivfpq" and m == candidates[-1]:
            return IndexChoice("ivfpq", f"IVF{nlist},PQ{m}", nlist=nlist, pq_m=m, estimated_bytes=pq_bytes,
                               reason=f"raw vectors ({flat_bytes / 2**30:.2f} GiB) exceed the budget: {m}-byte PQ codes")
    raise CacheError(f"no index of {n} x {dim} vectors fits a memory budget of {memory_budget} bytes")


@dataclass
class BuildResult:
    """What :func:`build_index` made: the index, its choice, tuned search parameters and measured recall."""

    index: Any
    choice: IndexChoice
    search_params: dict[str, int] = field(default_factory=dict)
    recall: float = 1.0
    recall_k: int = 10
    tuning: list[dict[str, float]] = field(default_factory=list)
    build_seconds: float = 0.0
    train_seconds: float = 0.0
    add_seconds: float = 0.0
    tune_seconds: float = 0.0
    path: Path | None = None
    cache: VisualCache | None = None


def _rows(x: Any, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(x[start:stop], dtype=np.float32)


def exact_knn(queries: np.ndarray, embeddings: Any, k: int, chunk: int = 262144) -> np.ndarray:
    """Exact inner-product top-``k`` ids ``[Q,k]`` of ``queries`` over ``embeddings`` (any ``[N,C]`` array), chunked."""
    faiss = faiss_module()
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(embeddings), chunk):
        block = _rows(embeddings, start, start + chunk)
        s, i = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + start], 1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-``k`` ids present in the found top-``k`` ids."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k)


def _drop_self(ids: np.ndarray, self_ids: np.ndarray | None, k: int) -> np.ndarray:
    """Remove each query's own row from its result list (queries sampled from the indexed set)."""
    if self_ids is None:
        return ids[:, :k]
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for r, (row, me) in enumerate(zip(ids, self_ids)):
        kept = row[row != me][:k]
        out[r, :len(kept)] = kept
    return out


def build_index(embeddings: Any, ids: Sequence[str] | None = None, out: str | Path | None = None, *,
                index_type: str = "auto", memory_budget: int | None = None, recall_target: float = 0.95,
                k: int = 10, queries: np.ndarray | None = None, n_queries: int = 500,
                train_size: int | None = None, exact_max: int = 50_000, use_gpu: bool | None = None,
                values: str = "auto", model: dict[str, Any] | None = None, seed: int = 0,
                show_progress: bool = True) -> BuildResult:
    """Build (and with ``out``, save) a FAISS inner-product index over ``embeddings`` ``[N,C]``.

    ``embeddings`` may be a memory map: it is read in chunks of 65536 rows. They should be
    L2-normalised (scores are then cosines); they are indexed as given. ``ids`` name the rows
    (``ids.txt``); FAISS id ``i`` is row ``i``. The index kind comes from :func:`choose_index`;
    IVF ``nprobe`` / HNSW ``efSearch`` is the smallest power of two whose recall@``k`` against exact
    search on held-out queries reaches ``recall_target`` (``queries``, else ``n_queries`` rows sampled
    from ``embeddings`` with each query's own row excluded from both result lists). IVF indexes train on
    ``train_size`` sampled rows (default 40 per list) and get a direct map so they reconstruct.

    ``values``: ``auto`` writes ``values.npy`` (float16) beside the index only when the index cannot
    reconstruct exactly (PQ); ``float16`` / ``float32`` always write it; ``none`` never. ``model`` is
    recorded in ``cache.json`` (e.g. ``{"preset": "huge", "sha256": ...}``).
    """
    faiss = faiss_module()
    start_time = time.perf_counter()
    n, dim = int(embeddings.shape[0]), int(embeddings.shape[1])
    if ids is not None and len(ids) != n:
        raise CacheError(f"{len(ids)} ids for {n} embeddings")
    choice = choose_index(n, dim, memory_budget, index_type, exact_max)
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    log.info("visual cache: %d x %d -> %s (%s)", n, dim, choice.factory, choice.reason)
    rng = np.random.default_rng(seed)
    index = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    if choice.kind == "ivfpq":  # polysemous codes serve Hamming filtering we do not use; training them is slow
        faiss.downcast_index(index).do_polysemous_training = False
    work = index
    if use_gpu and choice.kind != "hnsw":
        try:
            work = to_gpu(index)
        except Exception as e:  # noqa: BLE001 - e.g. PQ code sizes the GPU does not support
            log.warning("visual cache: building on CPU (GPU FAISS refused %s: %s)", choice.factory, e)
    t0 = time.perf_counter()
    if not index.is_trained or not work.is_trained:
        size = min(n, train_size or 40 * max(choice.nlist, 256 if choice.pq_m else 1))
        sample = np.sort(rng.choice(n, size, replace=False))
        work.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
    t1 = time.perf_counter()
    with tqdm(total=n, unit="vec", desc=f"indexing {choice.factory}", disable=not show_progress) as bar:
        for s in range(0, n, ADD_CHUNK):
            work.add(_rows(embeddings, s, s + ADD_CHUNK))
            bar.update(min(ADD_CHUNK, n - s))
    if work is not index:
        index = faiss.index_gpu_to_cpu(work)
    if choice.kind in ("ivf", "ivfpq"):
        faiss.extract_index_ivf(index).make_direct_map()

    result = BuildResult(index, choice, recall_k=k, train_seconds=t1 - t0, add_seconds=time.perf_counter() - t1)
    t2 = time.perf_counter()
    if choice.kind != "flat":
        _tune(result, embeddings, queries, n_queries, recall_target, k, rng, work if work is not index else None)
    result.tune_seconds = time.perf_counter() - t2
    result.build_seconds = time.perf_counter() - start_time
    if out is not None:
        result.path = Path(out)
        result.cache = save_cache(result, embeddings, ids, out, values=values, model=model,
                                  recall_target=recall_target)
    return result


def _tune(result: BuildResult, embeddings: Any, queries: np.ndarray | None, n_queries: int, target: float,
          k: int, rng: np.random.Generator, gpu_index: Any = None) -> None:
    """Smallest nprobe / efSearch reaching ``target`` recall@k on held-out queries (sets ``result``)."""
    n = int(embeddings.shape[0])
    self_ids = None
    if queries is None:
        self_ids = np.sort(rng.choice(n, min(n_queries, n), replace=False))
        queries = np.ascontiguousarray(embeddings[self_ids], dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    extra = 1 if self_ids is not None else 0
    truth = _drop_self(exact_knn(queries, embeddings, k + extra), self_ids, k)
    index = gpu_index if gpu_index is not None else result.index
    name, limit = ("efSearch", 2048) if result.choice.kind == "hnsw" else ("nprobe", result.choice.nlist)
    value, best = (16 if name == "efSearch" else 1), (0.0, 0)
    while True:
        set_search_param(index, name, value)
        found = _drop_self(index.search(queries, k + extra)[1], self_ids, k)
        rec = recall_at_k(found, truth, k)
        result.tuning.append({name: value, "recall": round(rec, 4)})
        if rec > best[0]:
            best = (rec, value)
        if rec >= target or value >= limit:
            break
        value *= 2
    chosen = value if rec >= target else best[1]
    if rec < target:
        log.warning("visual cache: recall@%d %.3f < target %.3f at every %s (PQ codes limit recall); using %s=%d",
                    k, best[0], target, name, name, chosen)
    set_search_param(result.index, name, chosen)
    result.search_params, result.recall = {name: chosen}, (rec if rec >= target else best[0])


def save_values(embeddings: Any, path: str | Path, dtype: str = "float16") -> None:
    """Write ``embeddings`` ``[N,C]`` to ``path`` as an ``.npy`` file of ``dtype``, chunk by chunk, atomically."""
    n, dim = int(embeddings.shape[0]), int(embeddings.shape[1])

    def write(tmp: str) -> None:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(n, dim))
        for s in range(0, n, ADD_CHUNK):
            arr[s:s + ADD_CHUNK] = embeddings[s:s + ADD_CHUNK]
        arr.flush()
        del arr

    atomic_write(Path(path), write)


def save_cache(result: BuildResult, embeddings: Any, ids: Sequence[str] | None, out: str | Path,
               values: str = "auto", model: dict[str, Any] | None = None,
               recall_target: float | None = None) -> VisualCache:
    """Write ``knn.index``, ``ids.txt``, optional ``values.npy`` and ``cache.json`` into ``out``; return the loaded cache."""
    faiss = faiss_module()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if values not in ("auto", "none", "float16", "float32"):
        raise ValueError(f"values must be auto, none, float16 or float32; got {values!r}")
    values_dtype = ("float16" if not result.choice.exact_values else None) if values == "auto" else \
        (None if values == "none" else values)
    if values_dtype:
        save_values(embeddings, out / VALUES_FILE, values_dtype)
    else:
        (out / VALUES_FILE).unlink(missing_ok=True)
    atomic_write(out / INDEX_FILE, lambda tmp: faiss.write_index(result.index, tmp))
    if ids is not None:
        atomic_write(out / IDS_FILE, lambda tmp: Path(tmp).write_text("".join(f"{i}\n" for i in ids)))
    else:
        (out / IDS_FILE).unlink(missing_ok=True)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "index_file": INDEX_FILE,
        "values_file": VALUES_FILE if values_dtype else None, "values_dtype": values_dtype,
        "ids_file": IDS_FILE if ids is not None else None,
        "embedding_model": model or {}, "count": int(result.index.ntotal), "dim": int(result.index.d),
        "metric": "inner_product", "index_type": result.choice.factory, "index_kind": result.choice.kind,
        "choice": asdict(result.choice), "search_params": result.search_params,
        f"recall_at_{result.recall_k}": round(result.recall, 4), "recall_target": recall_target,
        "tuning": result.tuning, "build_seconds": round(result.build_seconds, 2),
        "index_bytes": (out / INDEX_FILE).stat().st_size,
    }
    atomic_write(out / META_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return load_cache(out)
