"""Stage-2 instruction data: Alpaca, LLaVA and ShareGPT JSON files behind one map-style dataset.

Formats (auto-detected per item):

* **Alpaca**: ``{"instruction", "input", "output"}`` -> one turn, the input template when ``input``
  is non-empty. (The official loader builds a text-only instruction with a trailing comma, so its prompt
  shows the string form of a 1-tuple, ``('Give three tips...',)``; that is not reproduced.)
* **LLaVA**: ``{"image", "conversations": [{"from": "human"|"gpt", "value"}, ...]}`` -> all turns,
  ``<image>`` placeholder removed; with ``official_first_turn=True`` only the first exchange, the
  placeholder kept verbatim (what the official loader does).
* **ShareGPT**: ``{"conversations": [...]}`` with ``from: human|gpt`` (also ``user``/``assistant``)
  or ``role``/``content`` entries, or ``{"messages": [...]}``; ``system`` entries are dropped.

Text-only items get the official "fake image" ``zeros(3,S,S)``: already in normalised space, so it is a
uniform image of the CLIP mean colour (not black), encoded and injected like a real image; ``text_only_injection=False`` keeps the zeros but sets ``inject=False``.
Only assistant turns (+ EOS) are in the loss.

Bad data is skipped and counted, never trained on in a garbled form: items that are malformed (wrong value
types included), lack a complete turn or name a missing image are dropped when the files are read
(:mod:`datamodules.instruction_files`, which also refuses unusable files with one line naming them), and an
image that fails to load is replaced by the next item. Like stage 1's, every batch carries ``skipped`` and
``reader`` (:class:`SkipCollate`), which the training module sums and logs as ``data/skipped_<reason>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from datamodules.captions import SkipCounter
from datamodules.common import resolve_tokenizer
from datamodules.instruction_files import (ASSISTANT_ROLES, SKIP_ROLES, USER_ROLES, InstructionRecord, MalformedItem,
                                           expand_files, load_instruction_records, load_records, parse_item)
from datamodules.length_grouped import DEFAULT_GROUP_SIZE, LengthGroupedSampler
from ibllm.processing.image import load_image
from ibllm.processing.samples import build_conversation_sample, build_sample, collate
from ibllm.processing.shards import world_info
from ibllm.processing.templates import format_prompt

__all__ = ["ASSISTANT_ROLES", "SKIP_ROLES", "USER_ROLES", "InstructionData", "InstructionDataset", "InstructionRecord",
           "MalformedItem", "SkipCollate", "expand_files", "load_records", "parse_item"]


class InstructionDataset(Dataset):
    """Map-style dataset of instruction samples (shuffling/sharding is left to the sampler).

    Each item: ``tokens``, ``labels`` (-100 = ignore), ``image [3,S,S]`` (the real image or the zero
    fake image), ``inject`` (bool) and ``text`` (first user message, for logging).
    """

    def __init__(
        self,
        records: Sequence[InstructionRecord],
        tokenizer: Any,
        max_words: int = 512,
        image_size: int = 224,
        train_transform: bool = True,
        text_only_injection: bool = True,
        ignore_unk: bool = False,
        max_retries: int = 8,
        load_skipped: Optional[dict[str, int]] = None,
    ) -> None:
        self.records = list(records)
        self.tokenizer = tokenizer
        self.max_words = max_words
        self.image_size = image_size
        self.train_transform = train_transform
        self.text_only_injection = text_only_injection
        self.ignore_unk = ignore_unk
        self.max_retries = max_retries
        self.load_skipped = dict(load_skipped or {})  # items dropped when the files were read
        self.counter = SkipCounter()  # items skipped while building samples (this process or worker)

    @property
    def skipped(self) -> dict[str, int]:
        """``{reason: count}`` of the items skipped while building samples in this process (or worker)."""
        return self.counter.counts

    def __len__(self) -> int:
        return len(self.records)

    def tokens(self, rec: InstructionRecord) -> dict[str, torch.Tensor]:
        """Tokens and labels of a record (official single-turn construction for ``official`` records)."""
        if rec.official:
            user, answer = rec.turns[0]
            return build_sample(self.tokenizer, format_prompt(user), answer, self.max_words, self.ignore_unk)
        return build_conversation_sample(self.tokenizer, rec.turns, self.max_words, rec.input, self.ignore_unk)

    def _build(self, rec: InstructionRecord) -> dict[str, Any]:
        sample: dict[str, Any] = dict(self.tokens(rec))
        if rec.image is not None:
            sample["image"] = load_image(rec.image, train=self.train_transform, size=self.image_size)
            sample["inject"] = True
        else:
            sample["image"] = torch.zeros(3, self.image_size, self.image_size)
            sample["inject"] = self.text_only_injection
        sample["text"] = rec.turns[0][0]
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Build item ``index``; an unreadable image is counted and the next item is used instead."""
        for attempt in range(self.max_retries + 1):
            rec = self.records[(index + attempt) % len(self.records)]
            try:
                return self._build(rec)
            except Exception as e:  # noqa: BLE001 - corrupt media must not stop training
                missing = rec.image is not None and not Path(rec.image).is_file()
                self.counter.add("missing_image" if missing else "bad_image",
                                 f"instruction item {(index + attempt) % len(self.records)}: {e}; using the next item")
        raise RuntimeError(f"{self.max_retries + 1} consecutive unreadable instruction items from index {index}")


class SkipCollate:
    """``collate`` plus the skip counts stage 1's batches carry (see :class:`ibllm.processing.shards.SkipTally`).

    Each batch gets ``skipped`` (``{reason: count}``: the items the building process or worker has skipped so
    far, plus, from worker 0 of each rank, those dropped when the files were read) and ``reader``
    (``"<split>/<global worker index>"``). Runs in the DataLoader worker, whose dataset copy holds its counts.
    """

    def __init__(self, dataset: "InstructionDataset", split: str) -> None:
        self.dataset = dataset
        self.split = split

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The padded batch of ``samples`` with ``skipped`` and ``reader``."""
        batch = collate(samples)
        worker = get_worker_info()
        dataset = worker.dataset if worker is not None else self.dataset
        info = world_info()
        counts = dict(dataset.skipped)
        if info.worker == 0:
            for reason, n in dataset.load_skipped.items():
                counts[reason] = counts.get(reason, 0) + n
        batch["skipped"] = counts
        batch["reader"] = f"{self.split}/{info.global_worker}"
        return batch


class InstructionData(L.LightningDataModule):
    """Stage-2 instruction data module.

    Args:
        train_files: JSON file(s) (Alpaca / LLaVA / ShareGPT, mixed freely) or a YAML ``META`` config.
        val_files: held-out file(s), same formats.
        tokenizer: object with ``encode(text, bos, eos)``, or a string (LLM preset / GGUF / model folder /
            tokenizer file) loaded with ``ibllm.build.load_tokenizer_for``; or call :meth:`set_tokenizer`.
        image_root: base directory for relative image paths (default: the JSON file's folder).
        max_words: token limit (512 in stage 2).
        batch_size, num_workers: per-rank loader settings (training drops the last short batch).
        image_size: square image side.
        train_transform: RandomResizedCrop(0.9–1.0) for training images.
        text_only_injection: True = text-only items inject the fake image (official); False = no injection.
        official_first_turn: LLaVA items as the official code builds them (first exchange, ``<image>`` kept).
        seed: seed of the single-process shuffle (under DDP Lightning swaps in a DistributedSampler).
        ignore_unk: also ignore label positions holding token 0.
        group_by_length: training batches of similar token lengths (shuffled megabatches of
            ``length_group_size`` global batches sorted by length, across all ranks), which cuts padding.

    Batches: ``tokens``, ``labels``, ``image [B,3,S,S]``, ``inject [B]``, ``text`` (list).
    """

    def __init__(
        self,
        train_files: Any = None,
        val_files: Any = None,
        tokenizer: Any = None,
        image_root: Optional[str] = None,
        max_words: int = 512,
        batch_size: int = 4,
        num_workers: int = 2,
        image_size: int = 224,
        train_transform: bool = True,
        text_only_injection: bool = True,
        official_first_turn: bool = False,
        seed: int = 0,
        ignore_unk: bool = False,
        pin_memory: bool = False,
        group_by_length: bool = False,
        length_group_size: int = DEFAULT_GROUP_SIZE,
    ) -> None:
        super().__init__()
        self.train_files = train_files
        self.val_files = val_files
        self.tokenizer = tokenizer
        self.image_root = image_root
        self.max_words = max_words
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.train_transform = train_transform
        self.text_only_injection = text_only_injection
        self.official_first_turn = official_first_turn
        self.seed = seed
        self.ignore_unk = ignore_unk
        self.pin_memory = pin_memory
        self.group_by_length = group_by_length
        self.length_group_size = length_group_size
        self.train_dataset: Optional[InstructionDataset] = None
        self.val_dataset: Optional[InstructionDataset] = None

    def get_tokenizer(self) -> Any:
        """The tokenizer object (a string given at construction is loaded here, once)."""
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__} needs a tokenizer: pass tokenizer= or call set_tokenizer()")
        self.tokenizer = resolve_tokenizer(self.tokenizer)
        return self.tokenizer

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Provide the tokenizer before ``setup``."""
        self.tokenizer = tokenizer

    def build_dataset(self, files: Any, train: bool) -> InstructionDataset:
        """Load ``files`` into an :class:`InstructionDataset` (train or eval transform)."""
        records, skipped = load_instruction_records(files, self.image_root, self.official_first_turn)
        return InstructionDataset(
            records,
            self.get_tokenizer(),
            max_words=self.max_words,
            image_size=self.image_size,
            train_transform=train and self.train_transform,
            text_only_injection=self.text_only_injection,
            ignore_unk=self.ignore_unk,
            load_skipped=skipped,
        )

    def check_inputs(self, stage: Optional[str] = "fit") -> None:
        """Read the stage's files now (kept for :meth:`setup`): an unusable one raises
        :class:`~ibllm.files.InputError` naming it, before anything is built or written."""
        self.setup(stage)

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the files for the requested stage."""
        if stage in (None, "fit") and self.train_files is not None and self.train_dataset is None:
            self.train_dataset = self.build_dataset(self.train_files, train=True)
        if stage in (None, "fit", "validate") and self.val_files is not None and self.val_dataset is None:
            self.val_dataset = self.build_dataset(self.val_files, train=False)

    def length_sampler(self, dataset: InstructionDataset) -> LengthGroupedSampler:
        """The length-grouped sampler of this rank (world size and rank from the attached trainer)."""
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        lengths = [len(dataset.tokens(rec)["tokens"]) for rec in dataset.records]
        return LengthGroupedSampler(lengths, self.batch_size, world, rank, self.seed, self.length_group_size)

    def _loader(self, dataset: InstructionDataset, train: bool) -> DataLoader:
        sampler = self.length_sampler(dataset) if train and self.group_by_length else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=SkipCollate(dataset, "train" if train else "val"),
            pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed) if train and sampler is None else None,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, padded to the longest sample."""
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None, "no train_files configured"
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> Any:
        """Held-out batches in file order (empty list when no val_files)."""
        if self.val_dataset is None and self.val_files is not None:
            self.val_dataset = self.build_dataset(self.val_files, train=False)
        return [] if self.val_dataset is None else self._loader(self.val_dataset, train=False)
