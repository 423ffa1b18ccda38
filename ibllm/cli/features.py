"""``python -m ibllm features``: precompute stage-1 image embeddings into copies of caption shards."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ibllm import features
from ibllm.features import extract_features, summarize


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m ibllm features``."""
    p = argparse.ArgumentParser(prog="python -m ibllm features", description=features.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="input shards: brace pattern, folder of *.tar, or list file")
    p.add_argument("--out", required=True, help="output folder (one shard per input shard, same name)")
    p.add_argument("--imagebind", default="huge", help="ImageBind preset of the frozen encoder (default: %(default)s)")
    p.add_argument("--imagebind-weights", default=None,
                   help="encoder weights (imagebind_huge.pth layout); omitted = random frozen towers (tests only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default: %(default)s)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: RANK / SLURM_PROCID / 0)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of processes (default: WORLD_SIZE / SLURM_NTASKS / 1)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage dtype of KEY.npy (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="encoder compute precision; bf16 autocast is faster on GPU (default: %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="image-decoding threads (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="redo shards whose output already exists")
    p.add_argument("--seed", type=int, default=0, help="seed of random encoder weights (no --imagebind-weights)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m ibllm features``: prints a JSON summary; exits 1 when a shard could not be read."""
    args = build_parser().parse_args(argv)
    if args.imagebind_weights is None:
        print("warning: no --imagebind-weights: encoding with RANDOM frozen ImageBind towers", file=sys.stderr)
    try:
        reports = extract_features(args.shards, args.out, args.imagebind, args.imagebind_weights, args.batch_size,
                                   args.device, args.rank, args.world_size, args.dtype, args.precision,
                                   args.workers, args.overwrite, args.seed, not args.no_progress)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise SystemExit(f"features: {e}") from None
    summary = summarize(reports)
    print(json.dumps(summary, indent=2))
    if summary["shards_failed"]:
        raise SystemExit("features: unreadable shards (no output written):\n  " + "\n  ".join(summary["shards_failed"]))
    return summary
