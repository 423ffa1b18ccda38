"""Shard plumbing shared by training data, feature extraction and the cache builder.

* :func:`expand_urls` — the one shard lister: brace patterns, ``::``-joined patterns, shell globs,
  folders of ``*.tar``, list files, or lists of any of these.
* :func:`read_tar_samples` / :func:`tar_samples` — the one tar reader: a streaming pass over a shard
  that groups consecutive members sharing a key (``KEY.jpg``, ``KEY.txt`` ... in the WebDataset layout)
  into :class:`TarSample` objects, which keep every member as it was (so a shard can be rewritten
  member for member) and give the ``{"__key__", "__url__", ext: bytes}`` dicts the data modules decode.
* :func:`world_info` — who is reading: rank, world size and local rank from ``torch.distributed`` or the
  launcher's environment (torchrun, SLURM, MPI), plus the DataLoader worker.
* :class:`SkipTally` — sums the per-reader skip counts that caption batches carry.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import braceexpand
import torch

# Image members of a shard sample (``KEY.<ext>``, compared lower-case), in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LIST_FILE_SUFFIXES = (".txt", ".list", ".lst", ".shards")
# A sample's key is the member path up to the first dot of its base name (the WebDataset rule).
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
# Members named like ``__meta__`` (optionally inside a folder) are archive metadata, not sample data.
_META_RE = re.compile(r"^__[^/]*__($|/)")

UrlSpec = Union[str, Path, Sequence[Union[str, Path]]]


# ---- listing ---------------------------------------------------------------------------------------
def is_remote(spec: str) -> bool:
    """True for a URL (``scheme://...``) or a ``pipe:`` command, which are opened as given, never checked."""
    return "://" in spec or spec.startswith("pipe:")


def expand_urls(spec: UrlSpec) -> list[str]:
    """Expand a shard spec into a flat list of URLs/paths, in order.

    Accepts a brace pattern (``data/{00000..00099}.tar``), several patterns joined with ``::``, a local
    shell glob (``data/*.tar``, sorted), a directory (its ``*.tar`` files, sorted), a list file (suffix
    ``.txt``/``.list``/``.lst``/``.shards``, one spec per line, ``#`` comments allowed), or a list of any
    of these. Remote URLs and ``pipe:`` commands pass through unchanged after brace expansion.
    """
    if isinstance(spec, (list, tuple)):
        return [u for item in spec for u in expand_urls(item)]
    spec = str(spec)
    if os.path.isdir(spec):
        return sorted(str(p) for p in Path(spec).glob("*.tar"))
    if spec.endswith(LIST_FILE_SUFFIXES) and os.path.isfile(spec):
        lines = [ln.strip() for ln in Path(spec).read_text().splitlines()]
        return expand_urls([ln for ln in lines if ln and not ln.startswith("#")])
    urls = []
    for part in spec.split("::"):
        for url in braceexpand.braceexpand(part) if part else ():
            if glob.has_magic(url) and not is_remote(url) and not os.path.exists(url):
                urls += sorted(glob.glob(url))
            else:
                urls.append(url)
    return urls


def rank_shards(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards of rank ``rank`` among ``world_size`` processes: ``shards[rank::world_size]``."""
    return list(shards)[rank::world_size]


def shard_name(url: str) -> str:
    """The file name of a shard url (``a/b/000001.tar`` -> ``000001.tar``; the last ``::`` part counts)."""
    return os.path.basename(url.rstrip("/").split("::")[-1])


# ---- who is reading --------------------------------------------------------------------------------
@dataclass
class WorldInfo:
    """Who is reading: distributed rank / world size, DataLoader worker id / count, and the local rank."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1
    local_rank: int = 0

    @property
    def global_worker(self) -> int:
        """A unique reader index in ``[0, world_size * num_workers)``."""
        return self.rank * self.num_workers + self.worker


# Launcher variables, first match wins: torchrun, SLURM, Open MPI, MPICH / Intel MPI.
RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
WORLD_SIZE_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def _env_int(names: Sequence[str], env: Mapping[str, str]) -> Optional[int]:
    for name in names:
        value = env.get(name, "").strip()
        if value.lstrip("-").isdigit():
            return int(value)
    return None


def world_info(rank: Optional[int] = None, world_size: Optional[int] = None, worker: Optional[int] = None,
               num_workers: Optional[int] = None, env: Optional[Mapping[str, str]] = None) -> WorldInfo:
    """Resolve who is reading; explicit arguments win (tests and ``--rank``/``--world-size`` flags).

    Rank and world size come from an initialised ``torch.distributed`` group, else from the launcher's
    environment: ``RANK``/``WORLD_SIZE`` (torchrun), ``SLURM_PROCID``/``SLURM_NTASKS``, Open MPI's or
    MPICH's variables; a process that knows only its ``LOCAL_RANK`` and a world size (Lightning's
    launcher on one node) takes the local rank as its rank. Nothing set: rank 0 of 1. The worker is the
    DataLoader worker of the calling process (0 of 1 outside workers). Raises ValueError for a rank
    outside ``[0, world_size)``.
    """
    env = os.environ if env is None else env
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None and dist:
        rank = torch.distributed.get_rank()
    if rank is None:
        rank = _env_int(RANK_VARS, env)
        if rank is None and _env_int(WORLD_SIZE_VARS, env) is not None:
            rank = _env_int(("LOCAL_RANK",), env)
        rank = rank or 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if dist else _env_int(WORLD_SIZE_VARS, env) or 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    if worker is None or num_workers is None:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return WorldInfo(rank, world_size, worker, num_workers, _env_int(LOCAL_RANK_VARS, env) or 0)


# ---- reading tar shards ----------------------------------------------------------------------------
@dataclass
class TarSample:
    """Consecutive members of a shard sharing one key, kept exactly as stored.

    ``key`` is None for a member that belongs to no sample (a folder entry, a name without an
    extension); such a pseudo-sample holds that one member. ``members``: ``(TarInfo, bytes or None)``
    in archive order (None for non-file members).
    """

    key: Optional[str]
    url: str
    members: list[tuple[tarfile.TarInfo, Optional[bytes]]] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        """``{"__key__", "__url__", ext: bytes}`` with lower-case extensions (metadata members left out).

        Raises ValueError when two members share an extension.
        """
        out: dict[str, Any] = {"__key__": self.key, "__url__": self.url}
        for info, data in self.members:
            match = _KEY_RE.match(info.name)
            if data is None or match is None or _META_RE.match(info.name):
                continue
            ext = match.group(2).lower()
            if ext in out:
                raise ValueError(f"{self.url}: sample {self.key} has two {ext!r} members")
            out[ext] = data
        return out

    def image(self) -> Optional[tuple[str, bytes]]:
        """``(member name, bytes)`` of the first image member (:data:`IMAGE_EXTENSIONS`), or None."""
        for info, data in self.members:
            match = _KEY_RE.match(info.name)
            if data is not None and match and match.group(2).lower() in IMAGE_EXTENSIONS:
                return info.name, data
        return None


def open_shard(url: str) -> BinaryIO:
    """A binary stream of shard ``url``: a local file (a missing one raises FileNotFoundError naming it),
    or a remote URL / ``pipe:`` command through webdataset's opener."""
    if os.path.exists(url) or not is_remote(url):
        return open(url, "rb")
    import webdataset as wds  # only remote shards need it, and it is slow to import

    return wds.gopen(url, "rb")


def read_tar_samples(url: str, stream: Optional[BinaryIO] = None) -> Iterator[TarSample]:
    """Every sample of shard ``url`` in archive order, read in one streaming pass (``stream``: already open).

    Unreadable or truncated shards raise (OSError, ``tarfile.TarError``, EOFError) where the damage is met.
    """
    own = stream is None
    stream = open_shard(url) if own else stream
    try:
        current: Optional[TarSample] = None
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                data = tar.extractfile(info).read() if info.isfile() else None
                match = _KEY_RE.match(info.name) if info.isfile() else None
                key = match.group(1) if match else None
                if current is None or key is None or key != current.key:
                    if current is not None:
                        yield current
                    current = TarSample(key, url)
                current.members.append((info, data))
                tar.members = []  # streaming: do not keep every header of a large shard in memory
        if current is not None:
            yield current
    finally:
        if own:
            stream.close()


def tar_samples(urls: Iterable[str], on_error: Callable[[Exception], None]) -> Iterator[dict[str, Any]]:
    """The ``fields()`` dicts of every keyed sample of every shard in ``urls``, shard after shard.

    A shard that cannot be opened or read is reported to ``on_error`` and the next shard follows (the
    samples read before the damage are kept, the one being read is dropped); a sample with two members
    of one extension is reported and dropped.
    """
    for url in urls:
        samples = read_tar_samples(url)
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - any damage ends this shard, never the stream
                on_error(e)
                break
            if sample.key is None:
                continue
            try:
                fields = sample.fields()
            except ValueError as e:
                on_error(e)
                continue
            yield fields


# ---- skip counts -----------------------------------------------------------------------------------
class SkipTally:
    """Sums the skip counts that batches carry into one total across readers.

    A caption batch carries ``skipped`` (``{reason: count}``, cumulative for the DataLoader worker that
    built it) and ``reader`` (``"<split>/<global worker index>"``); the total keeps the latest count of
    each reader: the current training epoch plus the latest validation pass.
    """

    def __init__(self) -> None:
        self._latest: dict[Any, dict[str, int]] = {}

    def update(self, batch: Any) -> None:
        """Record the skip counts a batch carries (no-op for batches that carry none)."""
        if isinstance(batch, dict) and "skipped" in batch:
            self._latest[batch.get("reader", 0)] = dict(batch["skipped"])

    def reset(self) -> None:
        """Forget everything."""
        self._latest.clear()

    @property
    def totals(self) -> dict[str, int]:
        """``{reason: count}`` summed over readers."""
        out: dict[str, int] = {}
        for counts in self._latest.values():
            for k, v in counts.items():
                out[k] = out.get(k, 0) + v
        return out
