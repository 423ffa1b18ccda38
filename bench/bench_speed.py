"""Speed at the official benchmark shape: stage-1 step, stage-2 step and greedy decode, fp32 and bf16.

Shape: LLaMA dim 4096, 32 heads, vocab 32000, 2 layers (random weights), visual feature width 1024;
training batch 4 x 96 tokens with a 40-token prompt whose labels are ignored (stage 1: a 16-token caption
then padding to the official fixed 96; stage 2: a 56-token answer), forward + backward + AdamW on the
stage's trainable set through the same loss and optimizer construction as ``ibllm.lit`` (best of
``--steps`` after one warm-up step); decode: the stage-2 model, 32 greedy tokens after a 40-token prompt
(best of ``--steps`` after one warm-up). "fp32" keeps every weight in fp32; "bf16" is the default
training precision (frozen weights stored in bf16, bf16 autocast, trainables fp32).

Each measurement runs in a fresh process. ``--baseline DIR`` also measures another checkout (e.g.
``git archive <commit> | tar -x -C DIR``) in the same invocation, interleaved with the current tree, so
both see the same machine load. Ratios are to the official code's figures measured on the development
machine (given below), so they are only meaningful on that kind of machine, idle. On a shared machine,
compare the current tree with the baseline (wall and CPU seconds of the step) and read the last column:
the issue's ratio of the baseline to the official code, times the measured speed-up over the baseline.


    python bench/bench_speed.py --threads 1 --baseline /tmp/ibllm-base
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OFFICIAL_S = {"stage1": 18.8, "stage2": 8.37, "decode": 8.03}  # official code, one thread, same shape
# ibllm before this benchmark's changes, measured in the same run as OFFICIAL_S
ISSUE_IBLLM_S = {("stage1", "fp32"): 14.7, ("stage2", "fp32"): 8.01, ("decode", "fp32"): 6.64,
                 ("stage1", "bf16"): 13.1, ("stage2", "bf16"): 2.41, ("decode", "bf16"): 3.46}
SHAPE = dict(dim=4096, n_layers=2, n_heads=32, vocab_size=32000, multiple_of=256, max_seq_len=512, visual_dim=1024)
BATCH, SEQ, PROMPT, CAPTION, NEW_TOKENS = 4, 96, 40, 16, 32
ROOT = Path(__file__).resolve().parents[1]


def build(stage: str, precision: str):
    """The model at the benchmark shape (random normal weights, std 0.02), in the given precision."""
    import torch

    from ibllm import tuning
    from ibllm.config import llama_preset
    from ibllm.models.ibllm import ImageBindLLM

    with torch.device("meta"):
        model = ImageBindLLM(llama_preset("7B", **SHAPE), stage=stage)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=gen)
    if precision == "bf16":
        tuning.cast_frozen(model, torch.bfloat16)
    return model


def train_step_time(stage: str, precision: str, steps: int) -> dict:
    """Best step time of forward + loss + backward + AdamW, as ``ibllm.lit`` trains (fresh process)."""
    import torch

    from ibllm import lit, tuning
    from ibllm.models.ibllm import lm_loss

    model = build(stage, precision)
    module = (lit.PretrainModule if stage == "pretrain" else lit.FinetuneModule)()
    module.model = model
    groups = tuning.optimizer_groups(model, stage, 0.05)
    if hasattr(lit, "make_adamw"):
        optimizer = lit.make_adamw(groups, lr=1e-5, betas=(0.9, 0.95))
    else:  # the code before make_adamw built the optimizer this way
        optimizer = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, SHAPE["vocab_size"], (BATCH, SEQ), generator=gen)
    labels = tokens.clone()
    labels[:, :PROMPT] = -100
    if stage == "pretrain":
        labels[:, PROMPT + CAPTION:] = -100
    batch = {"tokens": tokens, "labels": labels, "feature": torch.randn(BATCH, SHAPE["visual_dim"], generator=gen)}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times, cpu = [], []
    for _ in range(steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        with autocast:
            loss = module.loss(batch) if hasattr(module, "loss") else lm_loss(module(batch), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"best_s": min(times[1:]), "best_cpu_s": min(cpu[1:]), "times": times, "loss": float(loss)}


def decode_time(precision: str, steps: int) -> dict:
    """Best wall time of 32 greedy tokens after a 40-token prompt, stage-2 model, batch 1 (fresh process)."""
    import torch

    from ibllm.generation import generate_tokens

    model = build("finetune", precision).eval()
    prompt = [list(range(3, 3 + PROMPT))]
    with torch.inference_mode():
        visual = model.visual_token(feature=torch.randn(1, SHAPE["visual_dim"], generator=torch.Generator().manual_seed(1)))
    times, cpu, out = [], [], None
    for _ in range(steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = generate_tokens(model, prompt, visual, max_gen_len=NEW_TOKENS, temperature=0, eos_id=-1)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    assert len(out[0]) == NEW_TOKENS
    return {"best_s": min(times[1:]), "best_cpu_s": min(cpu[1:]), "times": times, "tokens": out[0][:8]}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.part == "decode":
        result = decode_time(args.precision, args.steps)
    else:
        result = train_step_time("pretrain" if args.part == "stage1" else "finetune", args.precision, args.steps)
    import ibllm

    print("RESULT " + json.dumps({**result, "ibllm": str(Path(ibllm.__file__).parent)}))


def run_one(code: Path, part: str, precision: str, threads: int, steps: int) -> dict:
    """Run one measurement in a fresh interpreter that imports ``ibllm`` from ``code``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--part", part, "--precision", precision,
           "--threads", str(threads), "--steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=code, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{part} {precision} ({code}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed repetitions after one warm-up (best is kept)")
    parser.add_argument("--parts", default="stage1,stage2,decode")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--baseline", type=Path, help="another checkout to measure in the same run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    codes = {"current": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    rows = []
    for part in args.parts.split(","):
        for precision in args.precisions.split(","):
            for name, code in codes.items():
                result = run_one(code, part, precision, args.threads, args.steps)
                row = {"part": part, "precision": precision, "code": name, **result,
                       "vs_official": OFFICIAL_S[part] / result["best_s"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    by = {(r["part"], r["precision"], r["code"]): r for r in rows}
    header = " | ".join(f"{c} wall s (CPU s)" for c in codes)
    extra = " | speed-up wall (CPU) | x official, scaled from the issue's ibllm figure" if "baseline" in codes else ""
    print(f"\n| part | precision | {header}{extra} |")
    print("|---|---|" + "---|" * (len(codes) + (2 if extra else 0)))
    for part in args.parts.split(","):
        for precision in args.precisions.split(","):
            cells = [f"{by[part, precision, c]['best_s']:.2f} ({by[part, precision, c]['best_cpu_s']:.2f})" for c in codes]
            if extra:
                new, old = by[part, precision, "current"], by[part, precision, "baseline"]
                wall, cpu = old["best_s"] / new["best_s"], old["best_cpu_s"] / new["best_cpu_s"]
                issue = OFFICIAL_S[part] / ISSUE_IBLLM_S[part, precision]
                cells += [f"{wall:.2f}x ({cpu:.2f}x)", f"{issue * wall:.2f}x ({issue * cpu:.2f}x)"]
            print(f"| {part} | {precision} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
