"""``python -m ibllm cache``: build the visual cache (FAISS index of ImageBind image embeddings) from shards.

Each rank encodes its share of the shards (``shards[rank::world_size]``; ``--rank/--world-size``, else
the launcher's ``RANK``/``WORLD_SIZE``, ``SLURM_PROCID``/``SLURM_NTASKS`` or MPI's) with the frozen vision tower (eval
transform) and writes one part per shard under ``OUT/parts``; rank 0 then waits for every rank
(``torch.distributed`` barrier when initialised, else it polls for the ranks' markers), merges the
parts in shard order and builds one index (:func:`ibllm.cache_build.index.build_index`): ``OUT/knn.index``,
``ids.txt``, ``values.npy`` when the index cannot reconstruct exactly, and ``cache.json``. Complete parts
are reused on reruns (resumable); ``--overwrite`` re-encodes.

Use it with ``ibllm.cache.load_cache(OUT)`` -> ``ImageBindLLM.encode(inputs, cache=...)``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ibllm.cache import CacheError
from ibllm.cache_build.distributor import build_cache_from_shards
from ibllm.cache_build.mapper import make_factory
from ibllm.processing.shards import world_info
from ibllm.verbs.registry import run, verb


def parse_bytes(text: str | None) -> int | None:
    """``"8G"`` / ``"512M"`` / ``"1000000"`` -> bytes (None stays None)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 8G, 512M)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


@verb("cache", description=__doc__)
def cache_command(shards: str, out: str, imagebind: str = "huge", imagebind_weights: str | None = None,
                  batch_size: int = 64, device: Literal["cpu", "cuda"] | None = None,
                  precision: Literal["fp32", "bf16"] = "fp32", workers: int = 4, rank: int | None = None,
                  world_size: int | None = None, dtype: Literal["float32", "float16"] = "float32",
                  index_type: Literal["auto", "flat", "ivf", "ivfpq", "hnsw"] = "auto",
                  memory_budget: str | None = None,
                  recall_target: float = 0.95, exact_max: int = 50_000,
                  values: Literal["auto", "none", "float16", "float32"] = "auto", wait_timeout: float = 3600.0,
                  overwrite: bool = False, clean_parts: bool = False, seed: int = 0,
                  progress: bool = True) -> dict[str, Any]:
    """Build the visual cache; prints a JSON summary (rank 0's includes the index metadata).

    Args:
        shards: image shards: brace pattern, folder of *.tar, or list file
        out: cache folder (knn.index, cache.json, ids.txt, parts/)
        imagebind: ImageBind preset of the frozen encoder
        imagebind_weights: encoder weights; omitted = random towers (tests only)
        batch_size: images per encoder call
        device: default: cuda when available
        precision: encoder compute precision
        workers: image-decoding threads
        rank: this process's rank (default: RANK / SLURM_PROCID / 0)
        world_size: processes (default: WORLD_SIZE / SLURM_NTASKS / 1)
        dtype: storage dtype of the parts
        index_type: index kind; auto chooses by size and --memory-budget
        memory_budget: RAM the index may use, e.g. 8G (default: unlimited)
        recall_target: recall@10 to tune nprobe/efSearch for
        exact_max: largest set indexed exactly
        values: values.npy beside the index: auto = only when the index cannot reconstruct exactly
        wait_timeout: seconds rank 0 waits for the other ranks
        overwrite: re-encode shards whose part exists
        clean_parts: delete OUT/parts after the index is built
        seed: seed of random encoder weights and of sampling
        progress: progress bars (--no-progress: none)
    """
    if imagebind_weights is None:
        print("warning: no --imagebind-weights: encoding with RANDOM frozen ImageBind towers", file=sys.stderr)
    barrier = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        barrier = torch.distributed.barrier
    try:
        who = world_info(rank, world_size, 0, 1)
        factory = make_factory(imagebind, imagebind_weights, batch_size, device, precision, workers, seed)
        summary = build_cache_from_shards(
            shards, out, factory, who.rank, who.world_size, barrier, dtype=dtype, overwrite=overwrite,
            wait_timeout=wait_timeout, keep_parts=not clean_parts, show_progress=progress, index_type=index_type,
            memory_budget=parse_bytes(memory_budget), recall_target=recall_target, exact_max=exact_max,
            values=values, seed=seed)
    except (ValueError, KeyError, FileNotFoundError, TimeoutError, CacheError) as e:
        raise SystemExit(f"cache: {e}") from None
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m ibllm cache``: returns the summary."""
    return run("cache", argv)
