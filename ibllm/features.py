"""Precompute stage-1 image embeddings into WebDataset shards (``python -m ibllm features``).

ImageBind is frozen in both stages, so its image embedding of a sample never changes. This command
runs the vision encoder once per image and writes, for every input shard, an output shard of the same
name holding every original member plus ``KEY.npy``: the raw vision-encoder output (the postprocessed
``[C]`` embedding, exactly what ``ImageBindLLM.encode_branch("vision", image)`` returns), stored as
float32 by default (``--dtype float16`` halves the storage; the data module reads either back as
float32). Stage 1 then trains with ``WebDatasetCaptions(use_features=True)`` and
``PretrainModule(modalities=[])``: no encoder is built, and ``ImageBindLLM.visual_token(feature=...)``
normalises the feature exactly as the image path does.

Trade-off: features are computed from the EVAL transform (short side resized to the encoder's image
size, centre crop). Training from features therefore has no RandomResizedCrop(0.9–1.0) augmentation in
stage 1 (each image is seen through one fixed view every epoch). For the official recipe, which sees
each of ~940M pairs about once, this costs little; for small data sets trained for many epochs, the
image path's augmentation may generalise better.

Behaviour:

* Samples whose image is missing or cannot be decoded are copied through WITHOUT ``KEY.npy`` (the
  feature path then skips them as ``missing_feature``) and counted per reason in the report.
* An input ``KEY.npy`` is replaced by the new one. Members of a sample stay adjacent and in order.
* Each output shard is written to ``DIR/.NAME.partial`` and renamed into place when complete, so an
  existing ``DIR/NAME`` is always complete: reruns skip it (resumable; ``--overwrite`` redoes it).
* Ranks: rank ``R`` of ``W`` takes ``shards[R::W]`` (``--rank/--world-size``, else the launcher's
  variables: ``RANK``/``WORLD_SIZE``, ``SLURM_PROCID``/``SLURM_NTASKS``, or MPI's; else 0/1). Ranks never
  touch the same output file.
* An unreadable input shard is reported and skipped (no output); the command then ends with exit
  status 1 naming every failed shard, after finishing the others.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ibllm.build import build_encoder
from ibllm.config import imagebind_preset
from ibllm.processing.image import load_image
from ibllm.processing.shards import TarSample, expand_urls, rank_shards, read_tar_samples, shard_name, world_info
from ibllm.slurm import task_device

log = logging.getLogger(__name__)

FEATURE_EXTENSION = "npy"


@dataclass
class ShardReport:
    """What happened to one shard (``status``: written, exists, failed)."""

    shard: str
    status: str
    samples: int = 0
    encoded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""


def output_path(shard: str, out_dir: str | Path) -> Path:
    """Where the feature shard of input ``shard`` goes: ``out_dir / basename(shard)``."""
    return Path(out_dir) / shard_name(shard)


def _decode(sample: TarSample, image_size: int) -> torch.Tensor | tuple[str, str]:
    """The eval-transformed image ``[3,S,S]``, or ``(skip reason, detail)`` (``missing_image``, ``bad_image``)."""
    image = sample.image()
    if image is None:
        return "missing_image", str(sample.key)
    try:
        return load_image(image[1], train=False, size=image_size)
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
        return "bad_image", f"{image[0]}: {e}"


def _npy_bytes(feature: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, feature, allow_pickle=False)
    return buf.getvalue()


class FeatureWriter:
    """Encodes images with a frozen ImageBind vision tower and writes feature shards.

    Args:
        encoder: module mapping ``{"vision": [B,3,S,S]}`` to ``{"vision": [B,C]}`` (ImageBindModel).
        image_size: the encoder's input side (eval transform: resize short side + centre crop).
        batch_size: images per encoder call.
        device: where the encoder runs.
        dtype: storage dtype of ``KEY.npy`` (``float32`` or ``float16``).
        precision: encoder compute: ``fp32`` or ``bf16`` (autocast; CUDA only, faster, not bit-equal).
        workers: threads decoding images (PIL releases the GIL while decoding / resizing).
    """

    def __init__(self, encoder: torch.nn.Module, image_size: int = 224, batch_size: int = 64,
                 device: str | torch.device = "cpu", dtype: str = "float32", precision: str = "fp32",
                 workers: int = 4) -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError(f"feature dtype must be float32 or float16, got {dtype!r}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.image_size = image_size
        self.batch_size = batch_size
        self.dtype = np.dtype(dtype)
        self.precision = precision
        self.pool = ThreadPoolExecutor(max(1, workers)) if workers > 1 else None

    def encode(self, images: torch.Tensor) -> np.ndarray:
        """Raw vision embeddings ``[B,C]`` (float32 numpy) of a batch of transformed images."""
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            out = self.encoder({"vision": images.to(self.device)})["vision"]
        return out.float().cpu().numpy()

    def _batches(self, samples: Iterator[TarSample]) -> Iterator[list[TarSample]]:
        batch: list[TarSample] = []
        images = 0
        for sample in samples:
            batch.append(sample)
            images += sample.image() is not None
            if images >= self.batch_size:
                yield batch
                batch, images = [], 0
        if batch:
            yield batch

    def _features(self, batch: list[TarSample], report: ShardReport) -> list[np.ndarray | None]:
        decode = lambda s: _decode(s, self.image_size)  # noqa: E731
        decoded = list(self.pool.map(decode, batch) if self.pool else map(decode, batch))
        good = [i for i, d in enumerate(decoded) if isinstance(d, torch.Tensor)]
        for sample, d in zip(batch, decoded):
            if isinstance(d, tuple) and sample.key is not None:  # members without a key are not samples
                n = report.skipped[d[0]] = report.skipped.get(d[0], 0) + 1
                if n & (n - 1) == 0:  # warn on the 1st, 2nd, 4th ... skip of each reason per shard
                    log.warning("%s: %s (%s, %d so far in this shard)", report.shard, d[1], d[0], n)
        out: list[np.ndarray | None] = [None] * len(batch)
        if good:
            feats = self.encode(torch.stack([decoded[i] for i in good]))
            for i, f in zip(good, feats):
                out[i] = f.astype(self.dtype)
        return out

    def iter_features(self, shard: str, report: ShardReport, progress: Any = None) -> Iterator[tuple[TarSample, np.ndarray | None]]:
        """Every sample of ``shard`` with its embedding (None when skipped), encoded in batches; counts into ``report``."""
        for batch in self._batches(read_tar_samples(shard)):
            for sample, feature in zip(batch, self._features(batch, report)):
                report.samples += sample.key is not None
                report.encoded += feature is not None
                yield sample, feature
            if progress is not None:
                progress.update(len(batch))

    def write_shard(self, shard: str, dest: str | Path, progress: Any = None) -> ShardReport:
        """Encode every image of ``shard`` and write ``dest`` atomically (``.NAME.partial`` + rename)."""
        dest = Path(dest)
        report = ShardReport(shard, "written")
        start = time.perf_counter()
        tmp = dest.parent / f".{dest.name}.partial"
        try:
            with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as out:
                for sample, feature in self.iter_features(shard, report, progress):
                    self._write_sample(out, sample, feature)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        report.seconds = time.perf_counter() - start
        return report

    @staticmethod
    def _write_sample(out: tarfile.TarFile, sample: TarSample, feature: np.ndarray | None) -> None:
        npy_name = f"{sample.key}.{FEATURE_EXTENSION}"
        mtime = 0
        for info, data in sample.members:
            if info.name == npy_name and feature is not None:
                continue  # replaced below
            out.addfile(info, io.BytesIO(data) if data is not None else None)
            mtime = max(mtime, int(info.mtime))
        if feature is not None:
            payload = _npy_bytes(feature)
            info = tarfile.TarInfo(npy_name)
            info.size, info.mtime, info.mode = len(payload), mtime, 0o644
            out.addfile(info, io.BytesIO(payload))

    def close(self) -> None:
        """Stop the decode threads."""
        if self.pool is not None:
            self.pool.shutdown()


def extract_features(shards: Any, out_dir: str | Path, imagebind: str = "huge", imagebind_weights: str | None = None,
                     batch_size: int = 64, device: str | None = None, rank: int | None = None,
                     world_size: int | None = None, dtype: str = "float32", precision: str = "fp32",
                     workers: int = 4, overwrite: bool = False, seed: int = 0,
                     show_progress: bool = True) -> list[ShardReport]:
    """Write feature shards for this rank's share of ``shards`` into ``out_dir``; returns one report per shard.

    ``shards``: anything :func:`ibllm.processing.shards.expand_urls` takes (brace pattern, glob, folder of
    ``*.tar``, list file, list). The encoder is the ImageBind ``imagebind`` preset's vision tower with
    ``imagebind_weights`` (random frozen weights seeded by ``seed`` when None: tests and benchmarks only).
    ``rank`` / ``world_size`` default to :func:`ibllm.processing.shards.world_info`.
    """
    urls = expand_urls(shards)
    if not urls:
        raise ValueError(f"no shards match {shards!r}")
    out_dir = Path(out_dir)
    names: dict[Path, str] = {}
    for url in urls:
        dest = output_path(url, out_dir)
        if dest in names:
            raise ValueError(f"shards {names[dest]!r} and {url!r} would both be written to {dest}; "
                             f"output shards keep the input file name, so input names must be unique")
        if os.path.exists(url) and dest.resolve() == Path(url).resolve():
            raise ValueError(f"--out {out_dir} would overwrite the input shard {url}; choose another folder")
        names[dest] = url
    who = world_info(rank, world_size, 0, 1)
    rank, world_size = who.rank, who.world_size
    mine = rank_shards(urls, rank, world_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [u for u in mine if overwrite or not output_path(u, out_dir).exists()]
    reports = [ShardReport(u, "exists") for u in mine if u not in todo]
    if not todo:
        return reports
    device = task_device(device, who.local_rank)
    cfg = imagebind_preset(imagebind)
    torch.manual_seed(seed)
    encoder = build_encoder(cfg, imagebind_weights, ("vision",))
    writer = FeatureWriter(encoder, cfg.image_size, batch_size, device, dtype, precision, workers)
    bar = tqdm(total=len(todo), unit="shard", desc=f"features rank {rank}/{world_size}", disable=not show_progress)
    samples = tqdm(unit="sample", desc="samples", position=1, leave=False, disable=not show_progress)
    try:
        for url in todo:
            try:
                reports.append(writer.write_shard(url, output_path(url, out_dir), samples))
            except (OSError, tarfile.TarError, EOFError) as e:
                log.error("shard %s: unreadable (%s); no output written", url, e)
                reports.append(ShardReport(url, "failed", error=f"{type(e).__name__}: {e}"))
            done = [r for r in reports if r.status == "written"]
            bar.set_postfix(samples=sum(r.samples for r in done),
                            skipped=sum(sum(r.skipped.values()) for r in done))
            bar.update(1)
    finally:
        samples.close()
        bar.close()
        writer.close()
    return reports


def summarize(reports: Sequence[ShardReport]) -> dict[str, Any]:
    """Totals over shard reports: shards written/existing/failed, samples, encoded, skips per reason."""
    skipped: dict[str, int] = {}
    for r in reports:
        for k, v in r.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    return {"shards_written": sum(r.status == "written" for r in reports),
            "shards_existing": sum(r.status == "exists" for r in reports),
            "shards_failed": [f"{r.shard}: {r.error}" for r in reports if r.status == "failed"],
            "samples": sum(r.samples for r in reports), "encoded": sum(r.encoded for r in reports),
            "skipped": skipped, "seconds": round(sum(r.seconds for r in reports), 3)}
