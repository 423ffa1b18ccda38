"""Shard orders of the caption data: weighted sources, the shared epoch and the two ways to walk shards.

Listing shards and resolving ranks/workers live in :mod:`ibllm.processing.shards`.

* Training (``resampled=True``): every (rank, worker) draws shards independently and forever from the
  weighted sources with its own seed ``(seed, resume_count, epoch, rank, worker)``; the epoch length
  is fixed elsewhere (``samples_per_epoch``). This is the open_clip "resampled shards" approach.
* Evaluation (``resampled=False``): the shard list is split first by rank then by worker
  (``shards[rank::world][worker::workers]``, the semantics of ``wds.split_by_node`` +
  ``wds.split_by_worker``) so no two readers ever open the same shard; optional epoch-seeded shuffle.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ibllm.files import InputError
from ibllm.processing.shards import WorldInfo, expand_urls, is_remote, rank_shards


@dataclass
class Source:
    """One shard source: its expanded URLs and a sampling weight (used by the resampled path)."""

    urls: list[str]
    weight: float = 1.0


def parse_sources(spec: Any) -> list[Source]:
    """Parse ``urls`` or ``[{urls: ..., weight: ...}, ...]`` (dicts or objects with those fields) into sources."""
    if isinstance(spec, (str, Path)):
        spec = [spec]
    if isinstance(spec, Source):
        spec = [spec]
    items = list(spec)
    if items and all(isinstance(x, (str, Path)) for x in items):
        items = [{"urls": items}]
    sources = []
    for item in items:
        if isinstance(item, Source):
            sources.append(item)
            continue
        urls = item["urls"] if isinstance(item, dict) else item.urls
        weight = float(item.get("weight", 1.0) if isinstance(item, dict) else getattr(item, "weight", 1.0))
        expanded = expand_urls(urls)
        if not expanded:
            shown = urls[0] if isinstance(urls, (list, tuple)) and len(urls) == 1 else urls
            raise InputError(f"shards {str(shown)!r}: the pattern lists no shard (no file matches it)")
        if weight < 0:
            raise InputError(f"negative weight {weight} for shard source {urls!r}")
        sources.append(Source(expanded, weight))
    if not sources:
        raise InputError("no shard sources given")
    return sources


def check_local_shards(sources: Sequence[Source], spec: Any) -> None:
    """Refuse a source whose shards are all local files and none of them exists (a mistyped pattern), which
    would otherwise be found only after a thousand failed reads. Some missing shards are tolerated (they are
    skipped and counted as ``bad_shard``), and remote URLs are not checked."""
    for source in sources:
        local = [u for u in source.urls if not is_remote(u)]
        if local and len(local) == len(source.urls) and not any(os.path.exists(u) for u in local):
            what = f"{len(local)} shard files" if len(local) > 1 else "shard file"
            raise InputError(f"shards {spec!r}: none of its {what} exists (first: {local[0]})")


class SharedEpoch:
    """An epoch counter shared between the main process and DataLoader workers (set before iterating)."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = mp.Value("i", epoch)

    def set(self, epoch: int) -> None:
        """Set the epoch (call before creating the epoch's iterator)."""
        self._value.value = int(epoch)

    def get(self) -> int:
        """The current epoch."""
        return int(self._value.value)


def make_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any values (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resampled_shards(sources: Sequence[Source], seed: int, info: WorldInfo) -> Iterator[str]:
    """Endless stream of shard URLs: pick a source by weight, then a shard uniformly, with a per-reader RNG."""
    rng = random.Random(seed)
    weights = [s.weight for s in sources]
    if sum(weights) <= 0:
        raise ValueError("source weights must not all be zero")
    while True:
        (source,) = rng.choices(sources, weights=weights)
        yield rng.choice(source.urls)


def split_shards(urls: Sequence[str], info: WorldInfo) -> list[str]:
    """Shards of one reader: split by rank, then by worker (disjoint across all readers)."""
    return rank_shards(urls, info.rank, info.world_size)[info.worker :: info.num_workers]


def ordered_shards(
    urls: Sequence[str], info: WorldInfo, shuffle_seed: Optional[int] = None
) -> list[str]:
    """Non-resampled shard order: optionally shuffle the full list with a shared seed, then split."""
    urls = list(urls)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(urls)
    return split_shards(urls, info)


def restart_count(explicit: Optional[int] = None) -> int:
    """How many times this job was (re)started: explicit value, else ``SLURM_RESTART_COUNT``, else 0."""
    if explicit is not None:
        return int(explicit)
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
