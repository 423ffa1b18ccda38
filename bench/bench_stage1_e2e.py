"""Stage 1 end to end from shards: official-style recipe vs ibllm's, scaled down to one CPU thread.

Both read the same generated shards (320x240 JPEGs, captions of 4-24 words, a 1024-d ``.npy`` feature
per sample, SmolLM2 tokenizer) through ``CaptionShardDataset`` and train the same stage-1 model:

* official-style: decode + RandomResizedCrop every sample, the frozen vision encoder runs on every
  batch, tokens padded to a fixed 96;
* ibllm: the precomputed ``.npy`` features (``python -m ibllm features``), tokens padded to the batch's
  longest sample.

Scale: the 7B experiment's per-GPU micro-batch is 32 at max_words 96 with ImageBind-Huge and LLaMA-7B;
here batch 8, the ``mid`` encoder of bench_features.py (Huge's layout narrowed to 512 wide, 12 blocks)
and a LLaMA of dim 512, 4 layers, vocab 49152, bf16 frozen weights under autocast. Reports data time
(reader, one thread), step time (encoder + forward + backward + AdamW) and samples/s of the two run one
after the other in one thread (with data workers on other cores the data time overlaps the step).

    python bench/bench_stage1_e2e.py [--batches 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_data import demo_tokenizer, write_bench_shards  # noqa: E402
from bench.bench_features import encoder_config  # noqa: E402
from datamodules.captions import CaptionDecoder, CaptionShardDataset  # noqa: E402
from datamodules.shards import parse_sources  # noqa: E402
from ibllm import tuning  # noqa: E402
from ibllm.config import llama_preset  # noqa: E402
from ibllm.lit import make_adamw  # noqa: E402
from ibllm.models.ibllm import ImageBindLLM, loss_positions, selected_lm_loss  # noqa: E402
from ibllm.models.imagebind import build_imagebind  # noqa: E402
from ibllm.processing.shards import WorldInfo  # noqa: E402

FIXED = 96


def run(recipe: str, urls: str, tok, batches: int, batch: int) -> dict:
    """Data and step seconds over ``batches`` batches (after one warm-up batch) of one recipe."""
    official = recipe == "official-style"
    decoder = CaptionDecoder(tok, max_words=FIXED, image_size=224, train_transform=True, use_features=not official)
    data = CaptionShardDataset(parse_sources(urls), decoder, batch_size=batch, resampled=False, shuffle_buffer=100,
                               drop_last=True, name="bench")
    enc_cfg = encoder_config("mid")
    torch.manual_seed(0)
    encoder = build_imagebind(enc_cfg, ["vision"]) if official else None
    cfg = llama_preset("tiny", dim=512, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=49152, multiple_of=64,
                       max_seq_len=256, visual_dim=enc_cfg.out_embed_dim, lora_rank=8)
    model = ImageBindLLM(cfg, stage="pretrain", encoder=encoder).train()
    tuning.cast_frozen(model, torch.bfloat16)
    optimizer = make_adamw(tuning.optimizer_groups(model, "pretrain", 0.05), lr=1e-5, betas=(0.9, 0.95))
    reader = data.iter_reader(WorldInfo())
    data_s = step_s = 0.0
    tokens_seen = 0
    for k in range(batches + 1):
        t0 = time.perf_counter()
        b = next(reader)
        tokens, labels = b["tokens"], b["labels"]
        if official:  # fixed-length padding
            tokens = F.pad(tokens, (0, FIXED - tokens.shape[1]))
            labels = F.pad(labels, (0, FIXED - labels.shape[1]), value=-100)
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inputs = {"image": b["image"]} if official else {"feature": b["feature"]}
            loss = selected_lm_loss(model(tokens, **inputs, logits_at=loss_positions(labels)), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if k:
            data_s, step_s, tokens_seen = data_s + t1 - t0, step_s + t2 - t1, tokens_seen + tokens.numel()
    n = batches * batch
    return {"recipe": recipe, "data_ms": 1e3 * data_s / n, "step_ms": 1e3 * step_s / n,
            "samples_s": n / (data_s + step_s), "positions": tokens_seen / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok, name = demo_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_bench_shards(Path(tmp), (args.batches + 2) * args.batch)
        rows = [run(r, urls, tok, args.batches, args.batch) for r in ("official-style", "ibllm")]
    print(f"\nstage 1 end to end, batch {args.batch}, {args.batches} batches, {args.threads} thread(s), {name} tokenizer")
    print("| recipe | token positions / sample | data ms / sample | step ms / sample | samples/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['positions']:.0f} | {r['data_ms']:.1f} | {r['step_ms']:.1f} | {r['samples_s']:.1f} |")
    print(f"speed-up: {rows[1]['samples_s'] / rows[0]['samples_s']:.1f}x")


if __name__ == "__main__":
    main()
