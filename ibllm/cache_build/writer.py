"""Writer: one part per shard (embeddings + ids + a small JSON sidecar) and one marker per finished rank.

Layout under the cache folder::

    parts/NAME.npy        [n,C] L2-normalised embeddings of shard NAME (float32 or float16)
    parts/NAME.ids.txt    n sample ids, "NAME:KEY", one per line
    parts/NAME.json       {"shard", "count", "dim", "dtype", "model_sha256"}
    parts/rank-R-of-W.json  written by rank R when all its shards have parts

Every file is written to a temporary name and renamed into place, so a part that exists is complete:
reruns reuse it (when the encoder hash matches) and an interrupted build resumes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ibllm.atomic import atomic_write

PARTS_DIR = "parts"


def parts_dir(out: str | Path) -> Path:
    """The folder holding the per-shard parts of cache folder ``out``."""
    return Path(out) / PARTS_DIR


def part_info(out: str | Path, name: str) -> dict[str, Any] | None:
    """The sidecar of shard ``name``'s part, or None when the part is absent or incomplete."""
    d = parts_dir(out)
    files = [d / f"{name}.json", d / f"{name}.npy", d / f"{name}.ids.txt"]
    if not all(f.is_file() for f in files):
        return None
    try:
        return json.loads(files[0].read_text())
    except ValueError:
        return None


def write_part(out: str | Path, name: str, shard: str, ids: Sequence[str], embeddings: np.ndarray,
               model_sha256: str, dtype: str = "float32") -> dict[str, Any]:
    """Write shard ``name``'s part atomically (the sidecar last, so it marks completion); returns the sidecar."""
    d = parts_dir(out)
    emb = np.ascontiguousarray(embeddings, dtype=np.dtype(dtype))
    def write_npy(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object: np.save would append ".npy" to a path
            np.save(handle, emb, allow_pickle=False)

    atomic_write(d / f"{name}.npy", write_npy)
    atomic_write(d / f"{name}.ids.txt", lambda tmp: Path(tmp).write_text("".join(f"{i}\n" for i in ids)))
    info = {"shard": shard, "count": len(ids), "dim": int(emb.shape[1]), "dtype": dtype, "model_sha256": model_sha256}
    atomic_write(d / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(info) + "\n"))
    return info


def read_part(out: str | Path, name: str) -> tuple[list[str], np.ndarray]:
    """``(ids, embeddings memory map)`` of shard ``name``'s part; a broken part is an error naming its file."""
    d = parts_dir(out)
    ids = (d / f"{name}.ids.txt").read_text().splitlines()
    try:
        emb = np.load(d / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cache part {d / (name + '.npy')}: not readable ({e}); delete it and rerun") from None
    if emb.ndim != 2 or len(emb) != len(ids):
        raise ValueError(f"cache part {d / (name + '.npy')}: {emb.shape} embeddings for {len(ids)} ids")
    return ids, emb


def marker_path(out: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` records that its parts are complete."""
    return parts_dir(out) / f"rank-{rank:05d}-of-{world_size:05d}.json"


def write_marker(out: str | Path, rank: int, world_size: int, summary: dict[str, Any]) -> None:
    """Record that this rank's parts are complete."""
    atomic_write(marker_path(out, rank, world_size), lambda tmp: Path(tmp).write_text(json.dumps(summary) + "\n"))
