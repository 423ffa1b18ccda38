"""LightningDataModule for stage-1 image–caption WebDataset shards."""

from __future__ import annotations

import logging
from typing import Any, Optional

import lightning as L
from torch.utils.data import DataLoader

from datamodules.captions import CaptionDecoder, CaptionShardDataset, make_loader
from datamodules.common import resolve_tokenizer
from datamodules.shards import check_local_shards, parse_sources, restart_count

log = logging.getLogger(__name__)


class WebDatasetCaptions(L.LightningDataModule):
    """Image–caption pairs from shards in the img2dataset layout (``KEY.jpg`` + ``KEY.txt`` [+ json, npy]).

    Args:
        train: shard spec: brace pattern(s) (``::``-joined allowed), a directory of ``*.tar``, a list
            file, a list of those, or
            weighted sources ``[{"urls": ..., "weight": ...}, ...]``.
        val: shard spec for the held-out loader (read once per validation, no resampling).
        tokenizer: object with ``bos_id``, ``eos_id``, ``encode(text, bos, eos)``, or a string (LLM
            preset / GGUF / model folder / tokenizer file) loaded with ``ibllm.build.load_tokenizer_for``;
            may also be set later with :meth:`set_tokenizer`, before ``setup``.
        samples_per_epoch: training "epoch" length over all ranks (open_clip style).
        batch_size: per-rank batch size.
        num_workers: DataLoader workers per rank.
        max_words: token limit per sample (96 in stage 1).
        image_size: square image side.
        train_transform: RandomResizedCrop(0.9–1.0) training transform (False = eval transform).
        use_features: read precomputed embeddings from ``KEY.npy`` instead of decoding images
            (batches then carry ``feature [B,C]`` and no ``image``).
        resampled: resample training shards with replacement (by source weight); False reads each
            shard once per epoch (split across ranks and workers, epoch-seeded shard order).
        shuffle_buffer: training sample shuffle buffer.
        seed: base seed.
        resume_count: mixed into the seeds so a requeued run sees a new shard order; None reads
            ``SLURM_RESTART_COUNT`` (0 when unset).
        ignore_unk: also ignore label positions holding token 0, as the official loss does.
        pin_memory: pin batches in the loaders.

    Batches: ``tokens [B,S]``, ``labels [B,S]`` (-100 = ignore), ``image [B,3,H,W]`` or
    ``feature [B,C]``, ``inject [B]`` (all True), ``caption``/``key`` lists, ``skipped`` (per-worker
    cumulative ``{reason: count}``), ``reader`` (``"train/<worker>"``); the training module sums the
    counts over workers and logs them (``data/skipped_<reason>``).
    """

    def __init__(
        self,
        train: Any = None,
        val: Any = None,
        tokenizer: Any = None,
        samples_per_epoch: Optional[int] = None,
        batch_size: int = 4,
        num_workers: int = 2,
        max_words: int = 96,
        image_size: int = 224,
        train_transform: bool = True,
        use_features: bool = False,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resume_count: Optional[int] = None,
        ignore_unk: bool = False,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.train_spec = train
        self.val_spec = val
        self.tokenizer = tokenizer
        self.samples_per_epoch = samples_per_epoch
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_words = max_words
        self.image_size = image_size
        self.train_transform = train_transform
        self.use_features = use_features
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.resume_count = restart_count(resume_count)
        self.ignore_unk = ignore_unk
        self.pin_memory = pin_memory
        self.train_dataset: Optional[CaptionShardDataset] = None
        self.val_dataset: Optional[CaptionShardDataset] = None

    def get_tokenizer(self) -> Any:
        """The tokenizer object (a string given at construction is loaded here, once)."""
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__} needs a tokenizer: pass tokenizer= or call set_tokenizer()")
        self.tokenizer = resolve_tokenizer(self.tokenizer)
        return self.tokenizer

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Provide the tokenizer (e.g. from the LightningModule) before ``setup``."""
        self.tokenizer = tokenizer

    def _decoder(self, train: bool) -> CaptionDecoder:
        return CaptionDecoder(
            self.get_tokenizer(),
            max_words=self.max_words,
            image_size=self.image_size,
            train_transform=train and self.train_transform,
            use_features=self.use_features,
            ignore_unk=self.ignore_unk,
        )

    def build_train_dataset(self, rank: Optional[int] = None, world_size: Optional[int] = None) -> CaptionShardDataset:
        """The training dataset (explicit rank/world_size override torch.distributed)."""
        return CaptionShardDataset(
            parse_sources(self.train_spec),
            self._decoder(train=True),
            self.batch_size,
            resampled=self.resampled,
            samples_per_epoch=self.samples_per_epoch,
            num_workers=self.num_workers,
            shuffle_buffer=self.shuffle_buffer,
            shuffle_shards=True,
            seed=self.seed,
            resume_count=self.resume_count,
            drop_last=True,
            rank=rank,
            world_size=world_size,
            name="train",
        )

    def build_val_dataset(self, rank: Optional[int] = None, world_size: Optional[int] = None) -> CaptionShardDataset:
        """The held-out dataset: every shard once, fixed order, eval transform, no sample shuffle."""
        return CaptionShardDataset(
            parse_sources(self.val_spec),
            self._decoder(train=False),
            self.batch_size,
            resampled=False,
            samples_per_epoch=None,
            num_workers=self.num_workers,
            shuffle_buffer=1,
            shuffle_shards=False,
            seed=self.seed,
            drop_last=False,
            rank=rank,
            world_size=world_size,
            name="val",
        )

    def check_inputs(self, stage: Optional[str] = "fit") -> None:
        """Refuse a shard specification of the stage that lists no shard or only local files that do not
        exist (:class:`~ibllm.files.InputError` naming it), before anything is built or written."""
        for spec, stages in ((self.train_spec, (None, "fit")), (self.val_spec, (None, "fit", "validate"))):
            if spec is not None and stage in stages:
                check_local_shards(parse_sources(spec), spec)

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the datasets for the requested stage (after :meth:`check_inputs`)."""
        self.check_inputs(stage)
        if stage in (None, "fit") and self.train_spec is not None:
            self.train_dataset = self.build_train_dataset()
        if stage in (None, "fit", "validate") and self.val_spec is not None:
            self.val_dataset = self.build_val_dataset()

    def train_dataloader(self) -> DataLoader:
        """Resampled training batches; ``len`` = batches per rank per epoch."""
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None, "no training shards configured"
        return make_loader(self.train_dataset, self.num_workers, self.pin_memory)

    def val_dataloader(self) -> Any:
        """Held-out batches (empty list when no validation shards are configured)."""
        if self.val_dataset is None and self.val_spec is not None:
            self.val_dataset = self.build_val_dataset()
        if self.val_dataset is None:
            return []
        return make_loader(self.val_dataset, self.num_workers, self.pin_memory)

    def state_dict(self) -> dict[str, Any]:
        """Saved with Lightning checkpoints: how often this run has been resumed."""
        return {"resume_count": self.resume_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume, bump the resume count so the resumed epoch draws a fresh shard order."""
        self.resume_count = max(self.resume_count, int(state_dict.get("resume_count", 0)) + 1)
        for ds in (self.train_dataset,):
            if ds is not None:
                ds.resume_count = self.resume_count
