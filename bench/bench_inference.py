"""Inference benchmark (prints figures; not a test): time-to-first-token and decode tokens/s on CPU for one
prompt and a batch of 8, through ``ibllm.load`` on the demo-size model (SmolLM2-135M-Instruct GGUF base,
``demo`` ImageBind vision tower, a stage-2 adapter with random trainables), LoRA un-merged and merged.

Figures are the best of ``--reps`` runs (and the median). TTFT = from the call to the first generated token (image decode + ImageBind + bind network + prompt
prefill). Decode tokens/s = generated tokens after the first / time after the first (batch: all rows).
Generation runs a fixed number of steps (EOS disabled) with greedy decoding.

    python bench/bench_inference.py [--max-gen-len 64] [--reps 3] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_adapter(root: Path) -> tuple[Path, Path]:
    """A stage-2 checkpoint (random trainables) on smollm2-135m-instruct with a random demo encoder."""
    from ibllm import tuning
    from ibllm.checkpoints import save_atomic
    from ibllm.config import imagebind_preset
    from ibllm.lit import FinetuneModule
    from ibllm.models.imagebind import build_imagebind

    torch.manual_seed(0)
    enc = root / "encoder.safetensors"
    save_atomic(dict(build_imagebind(imagebind_preset("demo"), modalities=["vision"]).state_dict()), enc)
    module = FinetuneModule(llm="smollm2-135m-instruct", imagebind="demo", imagebind_weights=str(enc))
    module.configure_model()
    with torch.no_grad():
        for _, p in tuning.trainable_parameters(module.model, "pretrain"):
            p.normal_(0, 0.02)
        for name, p in tuning.trainable_parameters(module.model, "finetune"):
            if "lora_B" in name or name.endswith(".bias"):
                p.normal_(0, 0.01)
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    ckpt["state_dict"].update({f"model.{k}": p.detach() for k, p in tuning.trainable_parameters(module.model, "pretrain")})
    ckpt["hyper_parameters"] = dict(module.hparams)
    path = root / "adapter.ckpt"
    torch.save(ckpt, path)
    image = root / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(image)
    return path, image


def run_once(model, image: Path, batch: int, max_gen_len: int) -> dict:
    """One timed generation: TTFT and decode throughput."""
    from ibllm.generation import stream_tokens
    from ibllm.processing.templates import format_prompt

    prompts = model.prompt_ids([format_prompt("Describe the image in detail.")] * batch, template=False)
    start = time.perf_counter()
    visual = model.visual({"image": [str(image)]})
    visual = visual.expand(batch, -1, -1)
    never = model.model.cfg.vocab_size  # an id that is never sampled: fixed-length runs
    first, steps = None, 0
    for step in stream_tokens(model.model, prompts, visual, max_gen_len, temperature=0.0, top_p=1.0, eos_id=never):
        steps += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    decode_tokens = (steps - 1) * batch
    return {"ttft_s": first - start, "decode_tok_s": decode_tokens / max(end - first, 1e-9),
            "prompt_tokens": len(prompts[0]), "generated_per_row": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-gen-len", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ibllm.api import load  # (`import ibllm` is a namespace package when run from bench/)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter, image = make_adapter(Path(tmp))
        t0 = time.perf_counter()
        model = load(adapter=adapter)
        load_s = time.perf_counter() - t0
        for merged in (False, True):
            if merged:
                model.merge()
            for batch in (1, 8):
                run_once(model, image, batch, 4)  # warm-up
                runs = [run_once(model, image, batch, args.max_gen_len) for _ in range(args.reps)]
                results.append({
                    "lora": "merged" if merged else "unmerged", "batch": batch,
                    "ttft_s": round(min(r["ttft_s"] for r in runs), 4),
                    "decode_tok_s": round(max(r["decode_tok_s"] for r in runs), 1),
                    "ttft_s_median": round(statistics.median(r["ttft_s"] for r in runs), 4),
                    "decode_tok_s_median": round(statistics.median(r["decode_tok_s"] for r in runs), 1),
                    "prompt_tokens": runs[0]["prompt_tokens"], "generated_per_row": runs[0]["generated_per_row"],
                })
                print(f"# {results[-1]}", file=sys.stderr, flush=True)  # partial results survive a timeout
    report = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model": "smollm2-135m-instruct (GGUF Q4_1 dequantised, fp32) + demo ImageBind vision, stage-2 adapter",
              "load_s": round(load_s, 2), "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['model']}; {report['threads']} CPU threads; torch {report['torch']}; load {report['load_s']} s")
    print("best of the repetitions (median in brackets; shared CPUs make medians noisy)")
    print(f"{'LoRA':<9} {'batch':>5} {'TTFT (s)':>18} {'decode tok/s':>18} {'prompt':>7} {'gen/row':>8}")
    for r in results:
        ttft = f"{r['ttft_s']:.3f} [{r['ttft_s_median']:.3f}]"
        tps = f"{r['decode_tok_s']:.1f} [{r['decode_tok_s_median']:.1f}]"
        print(f"{r['lora']:<9} {r['batch']:>5} {ttft:>18} {tps:>18} {r['prompt_tokens']:>7} {r['generated_per_row']:>8}")


if __name__ == "__main__":
    main()
