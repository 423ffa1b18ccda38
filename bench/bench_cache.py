"""Visual cache benchmark: build time, index size, search latency / QPS and recall@10 vs exact search.

Data: CLUSTERED synthetic 1024-d unit vectors shaped like image embeddings (a shared mean direction,
super-clusters, clusters of varying spread), not uniform noise (on which every index looks bad and
recall says nothing). Queries are held-out points of the same distribution (not in the index).
For every size the index chosen by ``build_index`` (auto, no memory budget) is measured, plus IVF-PQ
under ``--budget`` and, at sizes up to ``--flat-max``, the exact index for comparison. The 3M (CC3M)
case is extrapolated from the largest measured size. CPU unless GPU FAISS sees a GPU.

    python bench/bench_cache.py                          # 100k and 1M, a few minutes on 2 cores
    python bench/bench_cache.py --sizes 100000 --kinds auto,flat,ivfpq,hnsw
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibllm.cache import gpu_available  # noqa: E402
from ibllm.cache_build.index import build_index, exact_knn, recall_at_k  # noqa: E402


def clustered(n: int, dim: int, seed: int, noise: float = 1.0, chunk: int = 100_000) -> np.ndarray:
    """``n`` unit vectors in a 3-level hierarchy: shared mean + super-cluster (64) + cluster (n/50) + sub-cluster (n/5) + noise.

    Neighbour structure like image embeddings: nearest-neighbour cosine ~0.7, random pairs ~0.1
    (printed by the benchmark); clusters overlap the IVF lists rather than sitting one per list.
    """
    rng = np.random.default_rng(seed)
    rand = lambda m: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(  # noqa: E731
        rng.standard_normal((m, dim), dtype=np.float32))
    mean, supers = rand(1)[0], rand(64)
    n_clusters, n_subs = max(n // 50, 1), max(n // 5, 1)
    clusters = supers[rng.integers(0, 64, n_clusters)] + 0.8 * rand(n_clusters)
    subs = clusters[rng.integers(0, n_clusters, n_subs)] + 0.6 * rand(n_subs)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        out[s:s + m] = 0.6 * mean + subs[rng.integers(0, n_subs, m)] + noise * rng.standard_normal(
            (m, dim), dtype=np.float32) / np.float32(math.sqrt(dim))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def measure(data: np.ndarray, queries: np.ndarray, truth: np.ndarray, kind: str, budget: int | None,
            args: argparse.Namespace) -> dict:
    """Build one index over ``data`` and measure it."""
    t = time.perf_counter()
    result = build_index(data, None, None, index_type=kind, memory_budget=budget if kind == "ivfpq" else None,
                         recall_target=args.recall_target, n_queries=args.tune_queries, exact_max=args.exact_max,
                         show_progress=False)
    build = time.perf_counter() - t
    index = result.index
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        import faiss

        faiss.write_index(index, os.path.join(tmp, "knn.index"))
        size = os.path.getsize(os.path.join(tmp, "knn.index"))
    index.search(queries[:64], 10)  # warm-up
    lat = {}
    for b in (1, 64):
        times = []
        for r in range(args.repeats):
            q = queries[r * b % len(queries):][:b]
            s = time.perf_counter()
            index.search(q, 10)
            times.append(time.perf_counter() - s)
        lat[f"latency_ms_batch{b}"] = round(1000 * float(np.median(times)), 2)
    s = time.perf_counter()
    found = index.search(queries, 10)[1]
    qps = len(queries) / (time.perf_counter() - s)
    return {"n": len(data), "kind": result.choice.kind, "factory": result.choice.factory,
            "search_params": result.search_params, "build_s": round(build, 1),
            "train_s": round(result.train_seconds, 1), "add_s": round(result.add_seconds, 1),
            "tune_s": round(result.tune_seconds, 1), "index_mib": round(size / 2**20, 1), **lat,
            f"qps_batch{len(queries)}": round(qps, 1), "recall_at_10": round(recall_at_k(found, truth, 10), 4),
            "recall_at_build": round(result.recall, 4), "tuning": result.tuning}


def extrapolate(row: dict, n_to: int) -> dict:
    """Scale an IVF row to ``n_to`` vectors with nlist ~ sqrt(n) and the same nprobe (a model, not a measurement)."""
    f = n_to / row["n"]
    nlist_f = 2 ** round(math.log2(math.sqrt(n_to))) / 2 ** round(math.log2(math.sqrt(row["n"])))
    return {"n": n_to, "factory": row["factory"], "estimated": True,
            "train_s": round(row["train_s"] * nlist_f ** 2, 0),  # 40*nlist points x nlist centroids (upper bound)
            "add_s": round(row["add_s"] * f * nlist_f, 0),  # every vector against nlist centroids
            "index_mib": round(row["index_mib"] * f, 0),
            "qps": round(row[next(k for k in row if k.startswith("qps"))] * nlist_f / f, 1),  # scanned ~ n*nprobe/nlist
            "note": "same nprobe; recall roughly holds when nlist ~ sqrt(n) and nprobe/nlist shrinks slowly"}


def main() -> None:
    """Run the benchmark and print one JSON row per (size, index)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--kinds", default="auto,flat,ivfpq", help="auto, flat, ivf, ivfpq, hnsw (flat only up to --flat-max)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--tune-queries", type=int, default=200)
    p.add_argument("--recall-target", type=float, default=0.99)
    p.add_argument("--exact-max", type=int, default=50_000)
    p.add_argument("--budget", default="0.0625", help="IVF-PQ memory budget as a fraction of the raw fp32 vectors")
    p.add_argument("--flat-max", type=int, default=100_000)
    p.add_argument("--pq-max", type=int, default=100_000, help="PQ training is slow on 2 cores: sizes above are skipped")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tmp", default=None)
    args = p.parse_args()
    import faiss

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, GPU: {gpu_available()}", flush=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        t = time.perf_counter()
        data = clustered(n, args.dim, seed=0)
        rng = np.random.default_rng(1)
        # held-out queries (not in the index): random data points plus noise (cosine ~0.8 to their source)
        queries = data[rng.choice(n, args.queries, replace=False)] + 0.025 * rng.standard_normal(
            (args.queries, args.dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        truth = exact_knn(queries, data, 10)
        cos = np.einsum("qc,qkc->qk", queries[:100], data[truth[:100]])
        pairs = np.einsum("qc,qc->q", data[:1000], data[rng.choice(n, 1000)])
        print(f"# n={n}: data {time.perf_counter() - t:.1f}s (incl. exact ground truth); query cosine to its "
              f"1st / 10th neighbour {cos[:, 0].mean():.2f} / {cos[:, 9].mean():.2f}, random pairs {pairs.mean():.2f}",
              flush=True)
        for kind in args.kinds.split(","):
            if kind == "flat" and n > args.flat_max or kind == "ivfpq" and n > args.pq_max:
                continue
            budget = int(float(args.budget) * n * args.dim * 4)
            row = measure(data, queries, truth, kind, budget, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del data
    ivf = [r for r in rows if r["kind"] == "ivf"]
    if ivf:
        print(json.dumps({"extrapolated_3M": extrapolate(max(ivf, key=lambda r: r["n"]), 3_000_000)}))


if __name__ == "__main__":
    main()
