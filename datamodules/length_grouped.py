"""Length-grouped sampling: batches of similar-length samples, so padding to the longest wastes little.

Per epoch (seeded by ``seed + epoch``) the indices are shuffled and cut into megabatches of
``group_size`` global batches (global batch = ``batch_size x num_replicas``). Each megabatch is sorted
by length, longest first, and cut into global batches, so every global batch holds lengths that are
neighbours in sorted order; then the global batches are shuffled, with the one holding the longest sample
first (an out-of-memory shows at the first step). Rank ``r`` takes slice ``[r*B, (r+1)*B)`` of every global
batch, so all ranks of one step see similar lengths too (under data parallelism the slowest rank sets the
step time). When the dataset does not fill the last global batch, it is completed with samples from the
start of the epoch's order (as ``DistributedSampler`` pads), so every sample is seen at least once, and
exactly once when the length divides.

It subclasses ``DistributedSampler`` so that Lightning keeps it instead of wrapping it in its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

DEFAULT_GROUP_SIZE = 50  # global batches per sorted megabatch


def length_grouped_order(lengths: Sequence[int], global_batch: int, group_size: int,
                         generator: torch.Generator) -> list[int]:
    """Indices of one epoch, a whole number of length-homogeneous global batches (see the module doc)."""
    n = len(lengths)
    perm = torch.randperm(n, generator=generator).tolist()
    total = math.ceil(n / global_batch) * global_batch
    perm += (perm * math.ceil(total / n))[: total - n]  # complete the last global batch
    mega = global_batch * max(1, group_size)
    batches: list[list[int]] = []
    for start in range(0, total, mega):
        chunk = sorted(perm[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    batches = [batches[i] for i in order]
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))
    return [i for batch in batches for i in batch]


class LengthGroupedSampler(DistributedSampler):
    """Yields this rank's indices of :func:`length_grouped_order`; ``set_epoch`` reshuffles.

    ``lengths[i]`` is the token count of sample i; ``batch_size`` the per-rank batch the loader makes.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        if not lengths:
            raise ValueError("length-grouped sampling needs at least one sample")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = list(lengths)
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.group_size, self.epoch = seed, group_size, 0
        global_batch = batch_size * num_replicas
        self.num_samples = math.ceil(len(self.lengths) / global_batch) * batch_size

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        global_batch = self.batch_size * self.num_replicas
        order = length_grouped_order(self.lengths, global_batch, self.group_size, generator)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return iter([i for start in range(0, len(order), global_batch) for i in order[start + lo:start + hi]])


def padding_waste(batches: Sequence[Sequence[int]]) -> float:
    """Fraction of token positions that are padding when each batch of lengths is padded to its longest."""
    real = sum(sum(b) for b in batches)
    padded = sum(max(b) * len(b) for b in batches if b)
    return 1.0 - real / padded if padded else 0.0
