"""``python -m ibllm features``: precompute stage-1 image embeddings into copies of caption shards."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, Literal

from ibllm import features
from ibllm.features import extract_features, summarize
from ibllm.verbs.registry import run, verb


@verb("features", description=features.__doc__)
def features_command(shards: str, out: str, imagebind: str = "huge", imagebind_weights: str | None = None,
                     batch_size: int = 64, device: Literal["cpu", "cuda"] | None = None, rank: int | None = None,
                     world_size: int | None = None, dtype: Literal["float32", "float16"] = "float32",
                     precision: Literal["fp32", "bf16"] = "fp32", workers: int = 4, overwrite: bool = False,
                     seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Precompute stage-1 image embeddings; prints a JSON summary, exits 1 when a shard could not be read.

    Args:
        shards: input shards: brace pattern, folder of *.tar, or list file
        out: output folder (one shard per input shard, same name)
        imagebind: ImageBind preset of the frozen encoder
        imagebind_weights: encoder weights (imagebind_huge.pth layout); omitted = random frozen towers (tests only)
        batch_size: images per encoder call
        device: default: cuda when available
        rank: this process's rank (default: RANK / SLURM_PROCID / 0)
        world_size: number of processes (default: WORLD_SIZE / SLURM_NTASKS / 1)
        dtype: storage dtype of KEY.npy
        precision: encoder compute precision; bf16 autocast is faster on GPU
        workers: image-decoding threads
        overwrite: redo shards whose output already exists
        seed: seed of random encoder weights (no --imagebind-weights)
        progress: progress bars (--no-progress: none)
    """
    if imagebind_weights is None:
        print("warning: no --imagebind-weights: encoding with RANDOM frozen ImageBind towers", file=sys.stderr)
    try:
        reports = extract_features(shards, out, imagebind, imagebind_weights, batch_size, device, rank, world_size,
                                   dtype, precision, workers, overwrite, seed, progress)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise SystemExit(f"features: {e}") from None
    summary = summarize(reports)
    print(json.dumps(summary, indent=2))
    if summary["shards_failed"]:
        raise SystemExit("features: unreadable shards (no output written):\n  " + "\n  ".join(summary["shards_failed"]))
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m ibllm features``: returns the summary."""
    return run("features", argv)
