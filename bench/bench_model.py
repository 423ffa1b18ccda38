"""Model benchmarks (prints figures; not a test). Record results in BENCHMARKS.md with the machine.

CPU (default): training step (forward + backward + AdamW) tokens/s and peak-RSS growth for stage 1 and
stage 2 at a small config (dim 512, 8 layers, seq 96, batch 8), and greedy decode tokens/s with and
without the KV cache. ``--gpu``: the 7B shape in bf16 with random weights (samples/s, peak memory, MFU
counting 6·N FLOPs per token for trained parameters and 4·N for frozen ones — their activation
gradients are computed, their weight gradients are not —).

    python bench/bench_model.py            # CPU figures
    python bench/bench_model.py --gpu      # needs CUDA
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from ibllm import tuning
from ibllm.config import llama_preset
from ibllm.generation import generate_tokens
from ibllm.models.ibllm import ImageBindLLM, lm_loss

SMALL = dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, multiple_of=256, max_seq_len=512, visual_dim=1024)
A100_BF16_FLOPS = 312e12
H100_BF16_FLOPS = 989e12


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_step_bench(stage: str, steps: int, batch: int, seq: int, device: str, precision: str = "fp32") -> dict:
    """Forward + backward + optimizer step throughput of one stage (``precision`` fp32 or bf16: frozen
    weights stored in bf16, compute under bf16 autocast, trainables fp32)."""
    dtype = torch.bfloat16 if precision == "bf16" else None
    cfg = llama_preset("tiny", **SMALL) if device == "cpu" else llama_preset("7B")
    torch.manual_seed(0)
    with torch.device(device):
        model = ImageBindLLM(cfg, stage=stage)
    if dtype is not None:
        tuning.cast_frozen(model, dtype)
    optimizer = torch.optim.AdamW(tuning.optimizer_groups(model, stage, 0.05), lr=1e-5, betas=(0.9, 0.95))
    tokens = torch.randint(3, cfg.vocab_size, (batch, seq), device=device)
    feature = torch.randn(batch, cfg.visual_dim, device=device)
    base_rss = rss_mib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype is not None)
    timings = []
    for step in range(steps + 2):
        start = time.perf_counter()
        with autocast:
            loss = lm_loss(model(tokens, feature=feature), tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            timings.append(time.perf_counter() - start)
    step_s = sorted(timings)[len(timings) // 2]
    counts = tuning.count_parameters(model, stage)
    result = {"stage": stage, "device": device, "precision": precision, "batch": batch, "seq": seq, "step_s": step_s,
              "tokens_per_s": batch * seq / step_s, "samples_per_s": batch / step_s,
              "trainable": counts["trainable"], "total": counts["total"]}
    if device == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        flops = batch * seq * (6 * counts["trainable"] + 4 * (counts["total"] - counts["trainable"]))
        name = torch.cuda.get_device_name()
        peak = H100_BF16_FLOPS if "H100" in name or "H200" in name else A100_BF16_FLOPS  # H200: same dense peak
        result["mfu"] = flops / step_s / peak
    else:
        result["peak_rss_growth_mib"] = rss_mib() - base_rss
    return result


@torch.inference_mode()
def decode_bench(new_tokens: int, batch: int, prompt: int) -> dict:
    """Greedy decode tokens/s with and without the KV cache (small config, CPU)."""
    cfg = llama_preset("tiny", **SMALL)
    torch.manual_seed(0)
    model = ImageBindLLM(cfg, stage="finetune").eval()
    prompts = [list(range(3, 3 + prompt))] * batch
    visual = model.visual_token(feature=torch.randn(batch, cfg.visual_dim))
    out = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        generated = generate_tokens(model, prompts, visual, max_gen_len=new_tokens, temperature=0,
                                    eos_id=-1, use_cache=use_cache)
        elapsed = time.perf_counter() - start
        out["cached" if use_cache else "recompute"] = sum(map(len, generated)) / elapsed
    out["speedup"] = out["cached"] / out["recompute"]
    return out


def run_isolated(kind: str, **kwargs) -> dict:
    """Run one measurement in a fresh process so peak-RSS figures do not mix."""
    code = f"import json, bench.bench_model as b; print(json.dumps(b.{kind}(**{kwargs!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="7B shape on CUDA in bf16")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=96)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if args.gpu:
        name = torch.cuda.get_device_name()
        print(f"device: {name}")
        for stage, batch, seq in (("pretrain", 4, 96), ("finetune", 4, 512)):
            print(json.dumps(train_step_bench(stage, args.steps, batch, seq, "cuda", "bf16")))
        return
    for stage in tuning.STAGES:
        for precision in ("fp32", "bf16"):
            print(json.dumps(run_isolated("train_step_bench", stage=stage, steps=args.steps, batch=args.batch,
                                          seq=args.seq, device="cpu", precision=precision)))
    print(json.dumps({"decode": run_isolated("decode_bench", new_tokens=32, batch=4, prompt=64)}))


if __name__ == "__main__":
    main()
