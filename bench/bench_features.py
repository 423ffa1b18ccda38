"""Stage-1 training speed from images (frozen encoder running every step) vs from precomputed features.

Measures one stage-1 optimizer step (forward + backward + AdamW) of ``ImageBindLLM`` at a small LLM
(the ``tiny`` preset widened to dim 256, 4 layers, 4 heads; vocab 512), either from a ``[B,3,224,224]``
image batch through the frozen vision tower (``model(tokens, image=...)``) or from ``[B,C]`` features
(``model(tokens, feature=...)``, no encoder built). Encoders (random frozen weights; speed does not
depend on the values):

* ``demo``: the embedded demo's tower (128 wide, 2 blocks, 28-pixel patches: 64 tokens).
* ``mid``: the ``huge`` layout with the vision trunk narrowed to 512 wide, 12 blocks, 8 heads
  (14-pixel patches: 257 tokens; ViT-B-sized, about 38M parameters).
* ``huge`` (``--huge``): the real 632M-parameter ImageBind-Huge vision tower, at batch 2.

Also the per-sample data cost of one reader (decode PNG + eval transform, vs read ``KEY.npy``), so the
step figures can be put next to the loader's. Prints a table (fastest of the interleaved steps, medians beside) and the speed-up per encoder.

    python bench/bench_features.py [--steps 5] [--batch 8] [--seq 64] [--huge] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ibllm import tuning  # noqa: E402
from ibllm.config import ModalityConfig, imagebind_preset, llama_preset  # noqa: E402
from ibllm.models.ibllm import ImageBindLLM, lm_loss  # noqa: E402
from ibllm.models.imagebind import build_imagebind  # noqa: E402
from ibllm.processing.image import load_image  # noqa: E402

LLM = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=256)


def encoder_config(name: str):
    """The ImageBind config of a benchmark encoder (``demo``, ``mid``, ``huge``)."""
    if name == "mid":
        return imagebind_preset("huge", vision=ModalityConfig(512, 12, 8, pre_transformer_ln=True))
    return imagebind_preset(name)


class Stepper:
    """One stage-1 training step (forward + backward + AdamW) of a model on fixed inputs."""

    def __init__(self, model: ImageBindLLM, inputs: dict, tokens: torch.Tensor) -> None:
        self.model, self.inputs, self.tokens = model.train(), inputs, tokens
        self.optimizer = torch.optim.AdamW(tuning.optimizer_groups(model, "pretrain", 0.05), lr=1e-5,
                                           betas=(0.9, 0.95))
        self.timings: list[float] = []

    def __call__(self, record: bool = True) -> None:
        start = time.perf_counter()
        loss = lm_loss(self.model(self.tokens, **self.inputs), self.tokens)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if record:
            self.timings.append(time.perf_counter() - start)

    def best(self) -> float:
        """Fastest step (the CPUs are shared: the minimum is the least disturbed figure)."""
        return min(self.timings)

    def median(self) -> float:
        """Median step."""
        return sorted(self.timings)[len(self.timings) // 2]


def bench_encoder(name: str, batch: int, seq: int, steps: int, min_seconds: float = 15.0) -> dict:
    """Step time from images vs from features for one encoder: the two steps interleaved, 1 warm-up each,
    at least ``steps`` pairs and until ``min_seconds`` have passed (short steps get more samples)."""
    cfg = encoder_config(name)
    torch.manual_seed(0)
    encoder = build_imagebind(cfg, ["vision"])
    llm = llama_preset("tiny", **LLM, visual_dim=cfg.out_embed_dim)
    tokens = torch.randint(3, llm.vocab_size, (batch, seq))
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    with torch.inference_mode():
        features = encoder({"vision": images})["vision"].clone()
    from_images = Stepper(ImageBindLLM(llm, stage="pretrain", encoder=encoder), {"image": images}, tokens)
    from_features = Stepper(ImageBindLLM(llm, stage="pretrain"), {"feature": features}, tokens)
    from_images(record=False), from_features(record=False)
    start = time.perf_counter()
    while len(from_images.timings) < steps or time.perf_counter() - start < min_seconds:
        from_images()
        from_features()
    enc_params = sum(p.numel() for p in encoder.parameters())
    return {"encoder": name, "encoder_params": enc_params, "batch": batch, "seq": seq, "pairs": len(from_images.timings),
            "images_step_s": from_images.best(), "features_step_s": from_features.best(),
            "images_median_s": from_images.median(), "features_median_s": from_features.median(),
            "speedup": from_images.best() / from_features.best()}


def data_cost(samples: int = 200) -> dict:
    """Seconds per sample for one reader: PNG decode + eval transform vs ``np.load`` of a 1024-d feature."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    npy = io.BytesIO()
    np.save(npy, rng.standard_normal(1024).astype(np.float32))
    npy_bytes = npy.getvalue()
    start = time.perf_counter()
    for _ in range(samples):
        load_image(jpeg, train=False, size=224)
    t_img = (time.perf_counter() - start) / samples
    start = time.perf_counter()
    for _ in range(samples * 10):
        torch.from_numpy(np.asarray(np.load(io.BytesIO(npy_bytes), allow_pickle=False), dtype=np.float32))
    t_npy = (time.perf_counter() - start) / (samples * 10)
    return {"image_decode_s_per_sample": t_img, "feature_load_s_per_sample": t_npy}


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--huge", action="store_true", help="also the real ImageBind-Huge vision tower (batch 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=15.0, help="least time per encoder case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, LLM tiny widened {LLM}")
    rows = [bench_encoder(n, args.batch, args.seq, args.steps, args.min_seconds) for n in ("demo", "mid")]
    if args.huge:
        rows.append(bench_encoder("huge", 2, args.seq, max(2, args.steps // 2), args.min_seconds))
    print(f"{'encoder':<8}{'params':>12}{'batch':>7}{'images s/step':>15}{'features s/step':>17}"
          f"{'images steps/s':>16}{'features steps/s':>18}{'speed-up':>10}")
    for r in rows:
        print(f"{r['encoder']:<8}{r['encoder_params'] / 1e6:>11.1f}M{r['batch']:>7}{r['images_step_s']:>15.4f}"
              f"{r['features_step_s']:>17.4f}{1 / r['images_step_s']:>16.2f}{1 / r['features_step_s']:>18.2f}"
              f"{r['speedup']:>9.1f}x   ({r['pairs']} pairs; medians {r['images_median_s']:.4f} / {r['features_median_s']:.4f} s)")
    cost = data_cost()
    print(f"data, one reader: decode 320x240 JPEG + eval transform {cost['image_decode_s_per_sample'] * 1e3:.2f} ms/sample; "
          f"read KEY.npy {cost['feature_load_s_per_sample'] * 1e3:.3f} ms/sample")


if __name__ == "__main__":
    main()
