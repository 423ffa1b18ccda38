"""Lightning callback: build the visual cache (FAISS index of image embeddings) of an image set when training finishes.

Every rank of the trainer encodes its share of the shards (``shards[global_rank::world_size]``) with
the model's own frozen ImageBind vision tower (or, when the model was trained from precomputed features
and has no encoder, the ``imagebind`` / ``imagebind_weights`` of the module's hyper-parameters), writes
one part per shard, meets the others at the strategy's barrier, and rank 0 builds one FAISS index.
See :mod:`ibllm.cache_build`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from ibllm.build import build_encoder
from ibllm.cache_build.distributor import build_cache_from_shards
from ibllm.cache_build.mapper import ImageEmbedder, encoder_hash
from ibllm.config import imagebind_preset


class CacheBuilder(L.Callback):
    """Build ``out_dir`` (``knn.index`` + ``cache.json`` ...) from ``shards`` at the end of ``fit``.

    Args:
        shards: image shards (brace pattern, folder of ``*.tar``, list file, or a list).
        out_dir: the cache folder.
        batch_size / workers / precision: encoding settings (as ``python -m ibllm cache``).
        dtype: storage dtype of the per-shard parts.
        overwrite: re-encode shards whose part exists.
        index_options: passed to :func:`ibllm.cache_build.index.build_index` (``index_type``,
            ``memory_budget``, ``recall_target``, ``values``, ...).
    """

    def __init__(self, shards: Any, out_dir: str, batch_size: int = 64, workers: int = 4, precision: str = "fp32",
                 dtype: str = "float32", overwrite: bool = False, keep_parts: bool = True,
                 show_progress: bool = True, **index_options: Any) -> None:
        self.shards, self.out_dir = shards, Path(out_dir)
        self.batch_size, self.workers, self.precision, self.dtype = batch_size, workers, precision, dtype
        self.overwrite, self.keep_parts, self.show_progress = overwrite, keep_parts, show_progress
        self.index_options = index_options
        self.summary: dict[str, Any] | None = None

    def _factory(self, pl_module: L.LightningModule) -> Any:
        def factory() -> tuple[Any, dict[str, Any]]:
            hp = pl_module.hparams
            preset = hp.get("imagebind", "huge")
            encoder = getattr(getattr(pl_module, "model", None), "image_bind", None)
            if encoder is None or "vision" not in getattr(encoder, "modalities", ("vision",)):
                encoder = build_encoder(preset, hp.get("imagebind_weights"), ("vision",))
            size = getattr(getattr(encoder, "cfg", None), "image_size", None) or imagebind_preset(preset).image_size
            model = {"preset": preset, "weights": hp.get("imagebind_weights"), "sha256": encoder_hash(encoder)}
            embedder = ImageEmbedder(encoder, size, self.batch_size, pl_module.device, self.precision, self.workers)
            return embedder, model

        return factory

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Encode this rank's shards, barrier, rank 0 builds the index, barrier."""
        self.summary = build_cache_from_shards(
            self.shards, self.out_dir, self._factory(pl_module), trainer.global_rank, trainer.world_size,
            trainer.strategy.barrier, dtype=self.dtype, overwrite=self.overwrite, keep_parts=self.keep_parts,
            show_progress=self.show_progress and trainer.is_global_zero, **self.index_options)
        if trainer.is_global_zero:
            meta = self.summary["index"]
            print(f"visual cache: {meta['count']} images -> {self.out_dir} ({meta['index_type']}, "
                  f"recall@10 {meta.get('recall_at_10')})")
