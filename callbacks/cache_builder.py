"""Lightning callback: build the visual cache (FAISS index of image embeddings) of an image set when training finishes.

Only a finished training builds it: ``max_steps`` / ``max_epochs`` reached with no stop requested. A SLURM
preemption (``callbacks.preemption.RequeueAtStepEnd`` saves, requeues and sets ``trainer.should_stop``, and
its short grace period must not be spent encoding a corpus), an early stop, Ctrl-C, SIGTERM and a
non-finite loss (these three end ``fit`` with an exception, so ``on_train_end`` never runs) leave it unbuilt;
the requeued or resumed run that finishes builds it.

Every rank of the trainer encodes its share of the shards (``shards[global_rank::world_size]``), writes
one part per shard, meets the others at the strategy's barrier, and rank 0 builds one FAISS index.
The encoder is the module's ImageBind vision tower as ``python -m ibllm cache`` builds it: preset and
weights from the module's ``imagebind`` / ``imagebind_weights`` hyper-parameters, in float32 (the module's
own copy may be stored in bf16 or sharded); without weights the module's own (random) tower is used.
See :mod:`ibllm.cache_build`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

from ibllm.cache_build.distributor import build_cache_from_shards
from ibllm.cache_build.mapper import ImageEmbedder, encoder_hash, make_factory
from ibllm.config import imagebind_preset

log = logging.getLogger(__name__)


def unfinished_reason(trainer: L.Trainer) -> str | None:
    """Why ``fit`` did not finish its planned training (None when it did): read at ``on_train_end``."""
    if trainer.interrupted or getattr(trainer, "received_sigterm", False):
        return "training was interrupted"
    if trainer.should_stop:
        return f"training was stopped at global step {trainer.global_step} (preemption requeue or early stop)"
    max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return None
    if max_epochs is not None and max_epochs >= 0 and trainer.fit_loop.epoch_progress.current.processed >= max_epochs:
        return None
    return f"training ended at global step {trainer.global_step} before max_steps / max_epochs"


class CacheBuilder(L.Callback):
    """Build ``out_dir`` (``knn.index`` + ``cache.json`` ...) from ``shards`` when ``fit`` finishes training.

    Args:
        shards: image shards (brace pattern, folder of ``*.tar``, list file, or a list).
        out_dir: the cache folder; default ``<trainer.default_root_dir>/cache``.
        batch_size / workers / precision: encoding settings (as ``python -m ibllm cache``).
        dtype: storage dtype of the per-shard parts.
        overwrite: re-encode shards whose part exists (else complete parts of the same encoder are reused).
        keep_parts: keep ``out_dir/parts`` after the index is built.
        index_type / memory_budget (bytes) / recall_target / exact_max / values / seed: the index settings
            of :func:`ibllm.cache_build.index.build_index` (always inner product on L2-normalised embeddings).
    """

    def __init__(self, shards: Any, out_dir: str | None = None, batch_size: int = 64, workers: int = 4,
                 precision: str = "fp32", dtype: str = "float32", overwrite: bool = False, keep_parts: bool = True,
                 show_progress: bool = True, index_type: str = "auto", memory_budget: int | None = None,
                 recall_target: float = 0.95, exact_max: int = 50_000, values: str = "auto", seed: int = 0) -> None:
        self.shards, self.out_dir = shards, out_dir
        self.batch_size, self.workers, self.precision, self.dtype = batch_size, workers, precision, dtype
        self.overwrite, self.keep_parts, self.show_progress = overwrite, keep_parts, show_progress
        self.index_options = {"index_type": index_type, "memory_budget": memory_budget,
                              "recall_target": recall_target, "exact_max": exact_max, "values": values, "seed": seed}
        self.result: dict[str, Any] | None = None  # build_cache_from_shards's summary once built
        self.skipped: str | None = None  # why the cache was not built

    def folder(self, trainer: L.Trainer) -> Path:
        """The cache folder: ``out_dir``, else ``<default_root_dir>/cache``."""
        return Path(self.out_dir) if self.out_dir else Path(trainer.default_root_dir) / "cache"

    def _factory(self, pl_module: L.LightningModule) -> Any:
        hp = pl_module.hparams
        preset, weights = hp.get("imagebind", "huge"), hp.get("imagebind_weights")
        device = str(pl_module.device)
        if weights:
            return make_factory(preset, weights, self.batch_size, device, self.precision, self.workers,
                                hp.get("seed", 0))
        encoder = getattr(getattr(pl_module, "model", None), "image_bind", None)
        if encoder is None:
            raise ValueError("CacheBuilder needs the module's imagebind_weights (or its own vision tower)")

        def own_tower() -> tuple[Any, dict[str, Any]]:
            size = getattr(getattr(encoder, "cfg", None), "image_size", None) or imagebind_preset(preset).image_size
            model = {"preset": preset, "weights": None, "sha256": encoder_hash(encoder)}
            return ImageEmbedder(encoder, size, self.batch_size, device, self.precision, self.workers), model

        return own_tower

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """When training finished: encode this rank's shards, barrier, rank 0 builds the index, barrier."""
        out = self.folder(trainer)
        self.skipped = unfinished_reason(trainer)
        if self.skipped is not None:
            if trainer.is_global_zero:
                log.warning("visual cache %s not built: %s", out, self.skipped)
            return
        self.result = build_cache_from_shards(
            self.shards, out, self._factory(pl_module), trainer.global_rank, trainer.world_size,
            trainer.strategy.barrier, dtype=self.dtype, overwrite=self.overwrite, keep_parts=self.keep_parts,
            show_progress=self.show_progress and trainer.is_global_zero, **self.index_options)
        if trainer.is_global_zero:
            meta = self.result["index"]
            print(f"visual cache: {meta['count']} images -> {out} ({meta['index_type']}, "
                  f"recall@10 {meta.get('recall_at_10')})", flush=True)
