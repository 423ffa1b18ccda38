"""Shard lists: URL expansion, weighted sources, rank/worker info and the two shard orders.

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
from typing import Any, Iterator, Optional, Sequence, Union

import braceexpand
import torch

LIST_FILE_SUFFIXES = (".txt", ".list", ".lst", ".shards")

UrlSpec = Union[str, Path, Sequence[Union[str, Path]]]


def expand_urls(spec: UrlSpec) -> list[str]:
    """Expand a shard spec into a flat list of URLs/paths.

    Accepts a brace pattern (``data/{00000..00099}.tar``), several patterns joined with ``::``, a
    directory (its ``*.tar`` files, sorted), a list file (suffix ``.txt``/``.list``/``.lst``/``.shards``, one spec per line, ``#`` comments allowed),
    or a list of any of these.
    """
    if isinstance(spec, (list, tuple)):
        return [u for item in spec for u in expand_urls(item)]
    spec = str(spec)
    if os.path.isdir(spec):
        return sorted(str(p) for p in Path(spec).glob("*.tar"))
    if spec.endswith(LIST_FILE_SUFFIXES) and os.path.isfile(spec):
        lines = Path(spec).read_text().splitlines()
        return expand_urls([ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")])
    return [u for part in spec.split("::") if part for u in braceexpand.braceexpand(part)]


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
            raise ValueError(f"shard source {urls!r} expanded to no shards")
        if weight < 0:
            raise ValueError(f"negative weight {weight} for source {urls!r}")
        sources.append(Source(expanded, weight))
    if not sources:
        raise ValueError("no shard sources given")
    return sources


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


@dataclass
class ReaderInfo:
    """Who is reading: distributed rank/world size and DataLoader worker id/count."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def global_worker(self) -> int:
        """A unique reader index in ``[0, world_size * num_workers)``."""
        return self.rank * self.num_workers + self.worker


def dist_info(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """Rank and world size: explicit values, else torch.distributed, else ``RANK``/``WORLD_SIZE`` env, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def reader_info(
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    worker: Optional[int] = None,
    num_workers: Optional[int] = None,
) -> ReaderInfo:
    """Resolve a :class:`ReaderInfo`; explicit arguments win (tests simulate ranks/workers this way)."""
    r, w = dist_info(rank, world_size)
    if worker is None or num_workers is None:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return ReaderInfo(r, w, worker, num_workers)


def make_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any values (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resampled_shards(sources: Sequence[Source], seed: int, info: ReaderInfo) -> Iterator[str]:
    """Endless stream of shard URLs: pick a source by weight, then a shard uniformly, with a per-reader RNG."""
    rng = random.Random(seed)
    weights = [s.weight for s in sources]
    if sum(weights) <= 0:
        raise ValueError("source weights must not all be zero")
    while True:
        (source,) = rng.choices(sources, weights=weights)
        yield rng.choice(source.urls)


def split_shards(urls: Sequence[str], info: ReaderInfo) -> list[str]:
    """Shards of one reader: split by rank, then by worker (disjoint across all readers)."""
    return list(urls)[info.rank :: info.world_size][info.worker :: info.num_workers]


def ordered_shards(
    urls: Sequence[str], info: ReaderInfo, shuffle_seed: Optional[int] = None
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
