"""Distributor: every rank encodes its share of shards into parts; rank 0 merges them and builds the index."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ibllm.cache_build.index import ADD_CHUNK, build_index
from ibllm.cache_build.mapper import EmbedderFactory
from ibllm.cache_build.reader import shard_share
from ibllm.cache_build.writer import marker_path, part_info, parts_dir, read_part, write_marker, write_part
from ibllm.processing.shards import shard_name

log = logging.getLogger(__name__)


def wait_for_ranks(out: str | Path, world_size: int, timeout: float, poll: float = 2.0) -> None:
    """Rank 0 without ``torch.distributed``: wait until every rank's marker exists (or raise after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [r for r in range(world_size) if not marker_path(out, r, world_size).exists()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"cache: ranks {missing} of {world_size} did not finish their parts in "
                               f"{parts_dir(out)} within {timeout:.0f} s (start them with --rank R --world-size "
                               f"{world_size}, or rerun rank 0 once they are done)")
        time.sleep(poll)


def encode_share(urls: list[str], out: str | Path, factory: EmbedderFactory, model_sha256: str | None,
                 dtype: str = "float32", overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Write a part for every shard in ``urls`` (reusing complete parts of the same encoder); returns totals."""
    embedder, model, counts = None, {"sha256": model_sha256} if model_sha256 else None, \
        {"shards_encoded": 0, "shards_reused": 0, "samples": 0, "encoded": 0, "skipped": {}}
    bar = tqdm(urls, unit="shard", desc="cache: encoding", disable=not show_progress)
    try:
        for url in bar:
            name = shard_name(url)
            info = part_info(out, name)
            if info and not overwrite and (model is None or info["model_sha256"] == model["sha256"]):
                counts["shards_reused"] += 1
                counts["encoded"] += info["count"]
                continue
            if embedder is None:
                embedder, model = factory()
            try:
                ids, emb, report = embedder.embed_shard(url)
            except (OSError, EOFError) as e:
                raise ValueError(f"cache: shard {url} is unreadable ({type(e).__name__}: {e})") from None
            write_part(out, name, url, ids, emb, model["sha256"], dtype)
            counts["shards_encoded"] += 1
            counts["samples"] += report.samples
            counts["encoded"] += report.encoded
            for k, v in report.skipped.items():
                counts["skipped"][k] = counts["skipped"].get(k, 0) + v
    finally:
        bar.close()
        if embedder is not None:
            embedder.close()
    counts["model"] = model
    return counts


def merge_parts(urls: list[str], out: str | Path, dest: Path) -> tuple[list[str], np.ndarray, str]:
    """Concatenate every shard's part in shard order into ``dest`` (a float32 ``.npy`` memory map)."""
    infos = []
    for url in urls:
        info = part_info(out, shard_name(url))
        if info is None:
            raise ValueError(f"cache: no complete part for shard {url} in {parts_dir(out)}; did every rank finish?")
        infos.append(info)
    hashes = {i["model_sha256"] for i in infos}
    if len(hashes) != 1:
        raise ValueError(f"cache: the parts in {parts_dir(out)} come from {len(hashes)} different encoders; "
                         f"rerun with --overwrite")
    dims = {i["dim"] for i in infos}
    if len(dims) != 1:
        raise ValueError(f"cache: parts in {parts_dir(out)} have different widths {sorted(dims)}")
    total = sum(i["count"] for i in infos)
    if total == 0:
        raise ValueError(f"cache: no image could be encoded from {len(urls)} shards")
    merged = np.lib.format.open_memmap(dest, mode="w+", dtype=np.float32, shape=(total, dims.pop()))
    all_ids: list[str] = []
    row = 0
    for url in urls:
        ids, emb = read_part(out, shard_name(url))
        for s in range(0, len(ids), ADD_CHUNK):
            e = min(len(ids), s + ADD_CHUNK)
            merged[row + s: row + e] = emb[s:e]
        all_ids += ids
        row += len(ids)
    merged.flush()
    return all_ids, merged, hashes.pop()


def build_cache_from_shards(shards: Any, out: str | Path, factory: EmbedderFactory, rank: int = 0,
                            world_size: int = 1, barrier: Callable[[], None] | None = None,
                            model_sha256: str | None = None, dtype: str = "float32", overwrite: bool = False,
                            wait_timeout: float = 3600.0, keep_parts: bool = True, show_progress: bool = True,
                            model: dict[str, Any] | None = None, **index_options: Any) -> dict[str, Any]:
    """Encode this rank's share of ``shards`` into parts, synchronise, and on rank 0 build the cache in ``out``.

    ``barrier``: the collective to wait on (``torch.distributed.barrier``, a Lightning strategy's
    ``barrier``); called once after the parts and once after the index, by every rank. Without one,
    ranks are independent processes: each writes a marker and rank 0 polls for all markers
    (``wait_timeout`` seconds). ``model_sha256`` (when known) lets complete parts of the same encoder be
    reused without building it. ``model`` adds fields to the embedding-model description in
    ``cache.json``; ``index_options`` go to :func:`ibllm.cache_build.index.build_index`. Returns a summary.
    """
    out = Path(out)
    urls, mine = shard_share(shards, rank, world_size)
    parts_dir(out).mkdir(parents=True, exist_ok=True)
    marker_path(out, rank, world_size).unlink(missing_ok=True)
    summary: dict[str, Any] = {"rank": rank, "world_size": world_size, "shards": len(mine),
                               **encode_share(mine, out, factory, model_sha256, dtype, overwrite, show_progress)}
    write_marker(out, rank, world_size, {k: v for k, v in summary.items() if k != "model"})
    if barrier is not None:
        barrier()
    elif rank == 0 and world_size > 1:
        wait_for_ranks(out, world_size, wait_timeout)
    if rank == 0:
        merged_file = parts_dir(out) / ".merged.npy"
        try:
            ids, merged, sha = merge_parts(urls, out, merged_file)
            description = {**(summary.get("model") or {}), **(model or {}), "sha256": sha}
            result = build_index(merged, ids, out, model=description, show_progress=show_progress, **index_options)
            del merged
        finally:
            merged_file.unlink(missing_ok=True)
        if not keep_parts:
            shutil.rmtree(parts_dir(out), ignore_errors=True)
        summary["index"] = {k: v for k, v in result.cache.meta.items() if k not in ("tuning", "choice")}
        summary["cache"] = str(out)
    if barrier is not None:
        barrier()
    return summary
