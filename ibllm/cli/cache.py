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

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch

from ibllm.cache import CacheError
from ibllm.cache_build.distributor import build_cache_from_shards
from ibllm.cache_build.mapper import make_factory
from ibllm.processing.shards import world_info


def parse_bytes(text: str | None) -> int | None:
    """``"8G"`` / ``"512M"`` / ``"1000000"`` -> bytes (None stays None)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 8G, 512M)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m ibllm cache``."""
    p = argparse.ArgumentParser(prog="python -m ibllm cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="image shards: brace pattern, folder of *.tar, or list file")
    p.add_argument("--out", required=True, help="cache folder (knn.index, cache.json, ids.txt, parts/)")
    p.add_argument("--imagebind", default="huge", help="ImageBind preset of the frozen encoder (default: %(default)s)")
    p.add_argument("--imagebind-weights", default=None, help="encoder weights; omitted = random towers (tests only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="encoder compute precision")
    p.add_argument("--workers", type=int, default=4, help="image-decoding threads (default: %(default)s)")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: RANK / SLURM_PROCID / 0)")
    p.add_argument("--world-size", type=int, default=None, help="processes (default: WORLD_SIZE / SLURM_NTASKS / 1)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype of the parts")
    p.add_argument("--index-type", choices=("auto", "flat", "ivf", "ivfpq", "hnsw"), default="auto",
                   help="index kind; auto chooses by size and --memory-budget (default: %(default)s)")
    p.add_argument("--memory-budget", default=None, help="RAM the index may use, e.g. 8G (default: unlimited)")
    p.add_argument("--recall-target", type=float, default=0.95, help="recall@10 to tune nprobe/efSearch for")
    p.add_argument("--exact-max", type=int, default=50_000, help="largest set indexed exactly (default: %(default)s)")
    p.add_argument("--values", choices=("auto", "none", "float16", "float32"), default="auto",
                   help="values.npy beside the index: auto = only when the index cannot reconstruct exactly")
    p.add_argument("--wait-timeout", type=float, default=3600.0, help="seconds rank 0 waits for the other ranks")
    p.add_argument("--overwrite", action="store_true", help="re-encode shards whose part exists")
    p.add_argument("--clean-parts", action="store_true", help="delete OUT/parts after the index is built")
    p.add_argument("--seed", type=int, default=0, help="seed of random encoder weights and of sampling")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the command; prints a JSON summary (rank 0's includes the index metadata)."""
    args = build_parser().parse_args(argv)
    if args.imagebind_weights is None:
        print("warning: no --imagebind-weights: encoding with RANDOM frozen ImageBind towers", file=sys.stderr)
    barrier = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        barrier = torch.distributed.barrier
    try:
        who = world_info(args.rank, args.world_size, 0, 1)
        rank, world_size = who.rank, who.world_size
        factory = make_factory(args.imagebind, args.imagebind_weights, args.batch_size, args.device,
                               args.precision, args.workers, args.seed)
        summary = build_cache_from_shards(
            args.shards, args.out, factory, rank, world_size, barrier, dtype=args.dtype, overwrite=args.overwrite,
            wait_timeout=args.wait_timeout, keep_parts=not args.clean_parts, show_progress=not args.no_progress,
            index_type=args.index_type, memory_budget=parse_bytes(args.memory_budget),
            recall_target=args.recall_target, exact_max=args.exact_max, values=args.values, seed=args.seed)
    except (ValueError, KeyError, FileNotFoundError, TimeoutError, CacheError) as e:
        raise SystemExit(f"cache: {e}") from None
    print(json.dumps(summary, indent=2))
    return summary
