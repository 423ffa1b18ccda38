"""Stage-1 image–caption data from WebDataset shards (img2dataset layout).

Each sample in a tar is ``KEY.jpg|jpeg|png|webp`` + ``KEY.txt`` [+ ``KEY.json``] [+ ``KEY.npy``].
Training reads resampled shards (see ``shards.py``) for a fixed ``samples_per_epoch``; validation
reads every shard once, split across ranks and workers, in a fixed order, with the eval transform.

Bad data never stops training: corrupt images, missing captions/images, undecodable UTF-8, bad
``.npy`` features and unreadable shards are skipped and counted per reason. Every batch carries
``batch["skipped"]`` (a ``{reason: count}`` dict, cumulative for the worker that built the batch) and
``batch["reader"]`` (``"<split>/<global worker index>"``); the training module sums them across
workers with :class:`ibllm.processing.shards.SkipTally` and logs the totals.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.dataloader import _InfiniteConstantSampler

from datamodules.shards import SharedEpoch, Source, make_seed, ordered_shards, resampled_shards
from ibllm.processing.image import load_image
from ibllm.processing.samples import build_sample, collate
from ibllm.processing.shards import IMAGE_EXTENSIONS, WorldInfo, tar_samples, world_info
from ibllm.processing.templates import caption_prompt

log = logging.getLogger(__name__)


class SkipSample(Exception):
    """Raised by a decoder to drop a sample; ``reason`` names the counter to increment."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SkipCounter:
    """Per-reason skip counts of one reader; warns on the 1st, 2nd, 4th, 8th ... skip of each reason."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, reason: str, detail: str = "") -> None:
        """Count one skipped sample (or shard) under ``reason``."""
        n = self.counts.get(reason, 0) + 1
        self.counts[reason] = n
        if n & (n - 1) == 0:
            log.warning("skipped sample (%s, %d so far): %s", reason, n, detail)


class CaptionDecoder:
    """Turns one raw tar sample into a training sample (image or feature + tokens/labels)."""

    def __init__(
        self,
        tokenizer: Any,
        max_words: int = 96,
        image_size: int = 224,
        train_transform: bool = True,
        use_features: bool = False,
        ignore_unk: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.image_size = image_size
        self.train_transform = train_transform
        self.use_features = use_features
        self.ignore_unk = ignore_unk
        self.prompt = caption_prompt()

    def caption(self, raw: dict[str, Any]) -> str:
        """The caption from ``KEY.txt`` (falls back to ``caption`` in ``KEY.json``)."""
        data = raw.get("txt")
        if data is None and raw.get("json") is not None:
            try:
                data = json.loads(raw["json"]).get("caption")
            except (ValueError, AttributeError):
                data = None
        if data is None:
            raise SkipSample("missing_caption", raw.get("__key__", ""))
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SkipSample("bad_utf8", f"{raw.get('__key__')}: {e}") from None
        text = str(data).strip()
        if not text:
            raise SkipSample("missing_caption", f"{raw.get('__key__')}: empty")
        return text

    def media(self, raw: dict[str, Any], generator: Optional[torch.Generator]) -> dict[str, torch.Tensor]:
        """``{"feature": [C]}`` from ``KEY.npy`` when ``use_features``, else ``{"image": [3,S,S]}``."""
        key = raw.get("__key__", "")
        if self.use_features:
            if raw.get("npy") is None:
                raise SkipSample("missing_feature", key)
            try:
                arr = np.asarray(np.load(io.BytesIO(raw["npy"]), allow_pickle=False), dtype=np.float32).reshape(-1)
            except Exception as e:  # noqa: BLE001 - any unreadable array is a skip
                raise SkipSample("bad_feature", f"{key}: {e}") from None
            if not np.isfinite(arr).all():  # one inf would make the whole batch's loss non-finite
                raise SkipSample("bad_feature", f"{key}: non-finite values")
            return {"feature": torch.from_numpy(arr)}
        data = next((raw[e] for e in IMAGE_EXTENSIONS if raw.get(e) is not None), None)
        if data is None:
            raise SkipSample("missing_image", key)
        try:
            image = load_image(data, train=self.train_transform, size=self.image_size, generator=generator)
        except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
            raise SkipSample("bad_image", f"{key}: {e}") from None
        return {"image": image}

    def __call__(self, raw: dict[str, Any], generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """Decode ``raw`` or raise :class:`SkipSample`."""
        raw = {k.lower() if not k.startswith("__") else k: v for k, v in raw.items()}
        caption = self.caption(raw)
        sample: dict[str, Any] = self.media(raw, generator)
        sample.update(build_sample(self.tokenizer, self.prompt, caption, self.max_words, self.ignore_unk))
        sample["caption"] = caption
        sample["key"] = raw.get("__key__")
        return sample


def _shuffled(items: Iterable[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream with a buffer of ``bufsize`` items."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class CaptionShardDataset(IterableDataset):
    """Iterable of collated batches read from caption shards.

    Args:
        sources: parsed shard sources (``shards.parse_sources``).
        decoder: a :class:`CaptionDecoder` (or any callable ``(raw, generator) -> sample``).
        batch_size: samples per batch (batching happens in the worker).
        resampled: draw shards with replacement by source weight (training) or read each shard once.
        samples_per_epoch: epoch length over all ranks (required when ``resampled``); per rank the
            epoch is ``ceil(samples_per_epoch / (batch_size * world_size))`` batches, rounded up to a
            multiple of ``num_workers``.
        num_workers: DataLoader workers per rank (for the length computation).
        shuffle_buffer: sample shuffle buffer size (1 = off).
        shuffle_shards: shuffle the shard list per epoch in the non-resampled path.
        seed, resume_count: mixed with epoch/rank/worker into every RNG seed; bump ``resume_count``
            on a requeue so a resumed epoch does not replay the same shard order.
        drop_last: drop a final short batch.
        rank, world_size: override torch.distributed (tests; exotic launchers).
        max_consecutive_failures: give up (RuntimeError) after this many skips in a row with no good
            sample in between: the shard spec is wrong, and a resampled stream would otherwise spin forever.
        name: split name used in ``batch["reader"]`` (``"train/3"``), so skip tallies of different
            loaders do not overwrite each other.
    """

    def __init__(
        self,
        sources: list[Source],
        decoder: Callable[..., dict[str, Any]],
        batch_size: int,
        resampled: bool = True,
        samples_per_epoch: Optional[int] = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        seed: int = 0,
        resume_count: int = 0,
        drop_last: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        name: str = "train",
        max_consecutive_failures: int = 1000,
    ) -> None:
        super().__init__()
        if resampled and not samples_per_epoch:
            raise ValueError("resampled shards need samples_per_epoch (the stream is endless)")
        self.sources = sources
        self.decoder = decoder
        self.batch_size = batch_size
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch
        self.num_workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.resume_count = resume_count
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.name = name
        self.max_consecutive_failures = max_consecutive_failures
        self.epoch = SharedEpoch(0)
        self.counter = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the next iteration (shared with live workers)."""
        self.epoch.set(epoch)

    def batches_per_rank(self, world_size: Optional[int] = None) -> Optional[int]:
        """Batches one rank yields per epoch (None when the epoch is one pass over unknown data)."""
        if not self.samples_per_epoch:
            return None
        world = world_size if world_size is not None else world_info(self.rank, self.world_size, 0, 1).world_size
        n = math.ceil(self.samples_per_epoch / (self.batch_size * world))
        return math.ceil(n / self.num_workers) * self.num_workers

    def __len__(self) -> int:
        n = self.batches_per_rank()
        if n is None:
            raise TypeError("length unknown without samples_per_epoch")
        return n

    def shard_stream(self, info: WorldInfo) -> Iterator[str]:
        """The shard URLs this reader opens this epoch."""
        epoch = self.epoch.get()
        if self.resampled:
            seed = make_seed("shards", self.seed, self.resume_count, epoch, info.rank, info.worker)
            return resampled_shards(self.sources, seed, info)
        urls = [u for s in self.sources for u in s.urls]
        shuffle_seed = make_seed("order", self.seed, self.resume_count, epoch) if self.shuffle_shards else None
        return iter(ordered_shards(urls, info, shuffle_seed))

    def samples(self, info: WorldInfo) -> Iterator[dict[str, Any]]:
        """Decoded samples of one reader (skips counted in ``self.counter``)."""
        epoch = self.epoch.get()
        seed = make_seed("samples", self.seed, self.resume_count, epoch, info.rank, info.worker)
        rng = random.Random(seed)
        generator = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)

        failures = 0

        def fail(reason: str, detail: str) -> None:
            nonlocal failures
            self.counter.add(reason, detail)
            failures += 1
            if failures >= self.max_consecutive_failures:
                raise RuntimeError(
                    f"{failures} consecutive unreadable shards/samples (last: {reason}: {detail}); "
                    f"check the shard specification. Counts so far: {self.counter.counts}"
                )

        def on_tar_error(exc: Exception) -> None:
            fail("bad_shard", repr(exc))

        raw = tar_samples(self.shard_stream(info), on_tar_error)
        for item in _shuffled(raw, self.shuffle_buffer, rng):
            try:
                sample = self.decoder(item, generator)
            except SkipSample as e:
                fail(e.reason, str(e))
                continue
            failures = 0
            yield sample

    def iter_reader(self, info: WorldInfo) -> Iterator[dict[str, Any]]:
        """Collated batches for an explicit reader (tests call this to simulate ranks and workers)."""
        self.counter = SkipCounter()
        limit = None
        per_rank = self.batches_per_rank(info.world_size)
        if self.resampled and per_rank is not None:
            limit = math.ceil(per_rank / info.num_workers)
        buf: list[dict[str, Any]] = []
        produced = 0
        for sample in self.samples(info):
            buf.append(sample)
            if len(buf) == self.batch_size:
                yield self._batch(buf, info)
                buf, produced = [], produced + 1
                if limit is not None and produced >= limit:
                    return
        if buf and not self.drop_last:
            yield self._batch(buf, info)

    def _batch(self, samples: list[dict[str, Any]], info: WorldInfo) -> dict[str, Any]:
        batch = collate(samples)
        batch["skipped"] = dict(self.counter.counts)
        batch["reader"] = f"{self.name}/{info.global_worker}"
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_reader(world_info(self.rank, self.world_size))


class _EpochSampler(_InfiniteConstantSampler):
    """The iterable-dataset placeholder sampler plus ``set_epoch``, so Lightning's per-epoch call reaches us."""

    def __init__(self, dataset: CaptionShardDataset) -> None:
        super().__init__()
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        """Forward Lightning's epoch to the dataset's shared epoch."""
        self.dataset.set_epoch(epoch)


def make_loader(dataset: CaptionShardDataset, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over pre-batched data whose ``sampler.set_epoch`` (called by Lightning) seeds the dataset."""
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    # DataLoader forbids a sampler for iterable datasets; swap the inert default for one that forwards
    # set_epoch (it iterates identically).
    object.__setattr__(loader, "sampler", _EpochSampler(dataset))
    return loader
