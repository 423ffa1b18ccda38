"""Mapper: frozen ImageBind vision tower -> L2-normalised image embeddings of a shard's samples."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ibllm.build import build_encoder
from ibllm.config import imagebind_preset
from ibllm.features import FeatureWriter, ShardReport
from ibllm.processing.shards import shard_name
from ibllm.slurm import task_device


def encoder_hash(encoder: torch.nn.Module, branch: str = "vision") -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the encoder tensors used for ``branch`` (sorted by name)."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        if branch not in name.split("."):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ImageEmbedder:
    """Encodes every image of a shard (eval transform) into normalised ``[n,C]`` float32 embeddings.

    Reuses :class:`ibllm.features.FeatureWriter` for shard reading, decoding (threads) and batching;
    samples without a readable image are skipped and counted in the report.
    """

    def __init__(self, encoder: torch.nn.Module, image_size: int, batch_size: int = 64,
                 device: str | torch.device = "cpu", precision: str = "fp32", workers: int = 4) -> None:
        self.writer = FeatureWriter(encoder, image_size, batch_size, device, "float32", precision, workers)
        self.dim = int(getattr(encoder, "embed_dim", 0) or 0)

    def embed_shard(self, url: str, progress: Any = None) -> tuple[list[str], np.ndarray, ShardReport]:
        """``(ids "SHARD:KEY", embeddings [n,C] float32 L2-normalised, report)`` of one shard."""
        report = ShardReport(url, "written")
        ids, rows = [], []
        name = shard_name(url)
        for sample, feature in self.writer.iter_features(url, report, progress):
            if feature is not None and sample.key is not None:
                ids.append(f"{name}:{sample.key}")
                rows.append(feature)
        emb = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return ids, emb, report

    def close(self) -> None:
        """Stop the decode threads."""
        self.writer.close()


# (embedder, embedding-model description with "sha256") built only when a shard must be encoded.
EmbedderFactory = Callable[[], tuple[ImageEmbedder, dict[str, Any]]]


def make_factory(preset: str, weights: str | None, batch_size: int, device: str | None, precision: str,
                 workers: int, seed: int = 0) -> EmbedderFactory:
    """An embedder factory building the ``preset`` vision tower with ``weights`` (random, seeded by ``seed``,
    when None) on first use; ``device`` None = CUDA when available."""

    def factory() -> tuple[ImageEmbedder, dict[str, Any]]:
        cfg = imagebind_preset(preset)
        torch.manual_seed(seed)
        encoder = build_encoder(cfg, weights, ("vision",))
        model = {"preset": preset, "weights": weights, "sha256": encoder_hash(encoder)}
        dev = task_device(device)
        return ImageEmbedder(encoder, cfg.image_size, batch_size, dev, precision, workers), model

    return factory
