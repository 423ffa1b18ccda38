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
* Ranks: rank ``R`` of ``W`` takes ``shards[R::W]`` (``--rank/--world-size``, else ``RANK``/``WORLD_SIZE``,
  else ``SLURM_PROCID``/``SLURM_NTASKS``, else 0/1). Ranks never touch the same output file.
* An unreadable input shard is reported and skipped (no output); the command then ends with exit
  status 1 naming every failed shard, after finishing the others.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FEATURE_EXTENSION = "npy"
# webdataset's sample grouping: the key is the member path up to the first dot of its basename.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


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


@dataclass
class _Sample:
    key: str | None
    members: list[tuple[tarfile.TarInfo, bytes | None]]
    image: tuple[str, bytes] | None = None  # (member name, bytes) of the first image member


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Rank and world size: explicit values, else ``RANK``/``WORLD_SIZE``, else ``SLURM_PROCID``/``SLURM_NTASKS``, else (0, 1)."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


def rank_shards(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards rank ``rank`` of ``world_size`` processes: ``shards[rank::world_size]``."""
    return list(shards)[rank::world_size]


def output_path(shard: str, out_dir: str | Path) -> Path:
    """Where the feature shard of input ``shard`` goes: ``out_dir / basename(shard)``."""
    return Path(out_dir) / os.path.basename(shard.rstrip("/").split("::")[-1])


def _open_shard(shard: str) -> BinaryIO:
    if os.path.exists(shard) or "://" not in shard and not shard.startswith("pipe:"):
        return open(shard, "rb")  # a missing local file raises FileNotFoundError naming it
    import webdataset as wds

    return wds.gopen(shard, "rb")


def _read_samples(stream: BinaryIO) -> Iterator[_Sample]:
    """Group the members of a tar stream into samples (consecutive members sharing a key)."""
    current: _Sample | None = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            data = tar.extractfile(info).read() if info.isfile() else None
            match = _KEY_RE.match(info.name) if info.isfile() else None
            key = match.group(1) if match else None
            if current is None or key is None or key != current.key:
                if current is not None:
                    yield current
                current = _Sample(key, [])
            current.members.append((info, data))
            if match and current.image is None and match.group(2).lower() in IMAGE_EXTENSIONS:
                current.image = (info.name, data)
    if current is not None:
        yield current


def _decode(sample: _Sample, image_size: int) -> torch.Tensor | tuple[str, str]:
    """The eval-transformed image ``[3,S,S]``, or ``(skip reason, detail)`` (``missing_image``, ``bad_image``)."""
    from ibllm.processing.image import load_image

    if sample.image is None:
        return "missing_image", str(sample.key)
    try:
        return load_image(sample.image[1], train=False, size=image_size)
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
        return "bad_image", f"{sample.image[0]}: {e}"


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

    def _batches(self, samples: Iterator[_Sample]) -> Iterator[list[_Sample]]:
        batch: list[_Sample] = []
        for sample in samples:
            batch.append(sample)
            if sum(s.image is not None for s in batch) >= self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _features(self, batch: list[_Sample], report: ShardReport) -> list[np.ndarray | None]:
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

    def iter_features(self, shard: str, report: ShardReport, progress: Any = None) -> Iterator[tuple[_Sample, np.ndarray | None]]:
        """Every sample of ``shard`` with its embedding (None when skipped), encoded in batches; counts into ``report``."""
        with _open_shard(shard) as stream:
            for batch in self._batches(_read_samples(stream)):
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
    def _write_sample(out: tarfile.TarFile, sample: _Sample, feature: np.ndarray | None) -> None:
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

    ``shards``: anything :func:`datamodules.shards.expand_urls` takes (brace pattern, folder of ``*.tar``,
    list file, list). The encoder is the ImageBind ``imagebind`` preset's vision tower with
    ``imagebind_weights`` (random frozen weights seeded by ``seed`` when None: tests and benchmarks only).
    """
    from tqdm import tqdm

    from datamodules.shards import expand_urls
    from ibllm.build import build_encoder
    from ibllm.config import imagebind_preset

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
    rank, world_size = resolve_rank(rank, world_size)
    mine = rank_shards(urls, rank, world_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [u for u in mine if overwrite or not output_path(u, out_dir).exists()]
    reports = [ShardReport(u, "exists") for u in mine if u not in todo]
    if not todo:
        return reports
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m ibllm features``."""
    p = argparse.ArgumentParser(prog="python -m ibllm features", description=__doc__,
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
