"""Stage-2 padding waste, shuffled vs length-grouped batches, and the real-token throughput it buys.

Length sets: (1) the digits demo's instructions (``write_digit_instructions``, SmolLM2 tokenizer,
``max_words`` 160, as experiments/demo_finetune.yaml); (2) a generated Alpaca/LLaVA-like mix of token
lengths (no text): 52k Alpaca-GPT4-like samples, log-normal around 190 tokens (sigma 0.55), and 158k
LLaVA-Instruct-like ones, log-normal around 260 tokens (sigma 0.45), both clipped to [24, 512]
(``max_words`` 512, as experiments/finetune_7b.yaml). Waste = padding positions / all positions of a
step when every sample of a step is padded to the step's longest one: within a batch, and, under data
parallelism, across ranks (the slowest rank sets the step time; with 1 sample per GPU as in the 7B
experiment this is the only waste). ``--train`` also times real stage-2 steps (small LLaMA, CPU) on
shuffled vs grouped batches of the mix and reports real (non-padding) tokens/s.

    python bench/bench_padding.py [--train --threads 1]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_data import demo_tokenizer  # noqa: E402
from datamodules.instructions import InstructionDataset, load_records  # noqa: E402
from datamodules.length_grouped import LengthGroupedSampler, padding_waste  # noqa: E402
from ibllm.demos.digits.data import write_digit_instructions  # noqa: E402


def demo_lengths() -> list[int]:
    """Token lengths of the demo's training instructions (LLaVA image items + Alpaca text items)."""
    tok, name = demo_tokenizer()
    print(f"demo tokenizer: {name}")
    with tempfile.TemporaryDirectory() as tmp:
        files = write_digit_instructions(tmp)
        records = load_records([files.llava_train, files.alpaca_train], Path(tmp))
        ds = InstructionDataset(records, tok, max_words=160)
        return [len(ds.tokens(r)["tokens"]) for r in records]


def mix_lengths(seed: int = 0, scale: float = 1.0) -> list[int]:
    """The generated Alpaca/LLaVA-like length mix (see the module doc)."""
    rng = random.Random(seed)
    out = []
    for count, median, sigma in ((52_000, 190, 0.55), (158_000, 260, 0.45)):
        for _ in range(int(count * scale)):
            out.append(int(min(512, max(24, rng.lognormvariate(0, sigma) * median))))
    return out


def steps(lengths: list[int], batch: int, world: int, grouped: bool, seed: int = 0) -> list[list[int]]:
    """The samples (indices) of every training step, all ranks together, for one epoch."""
    if grouped:
        ranks = [list(LengthGroupedSampler(lengths, batch, world, r, seed)) for r in range(world)]
        return [[i for rank in ranks for i in rank[k:k + batch]] for k in range(0, len(ranks[0]), batch)]
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    g = batch * world
    return [order[k:k + g] for k in range(0, len(order) - g + 1, g)]


def waste_table(name: str, lengths: list[int], configs: list[tuple[int, int]]) -> None:
    print(f"\n{name}: {len(lengths)} samples, tokens min/median/max {min(lengths)}/{sorted(lengths)[len(lengths) // 2]}/{max(lengths)}")
    print("| batch x ranks | shuffled: padding waste | length-grouped: padding waste |")
    print("|---|---|---|")
    for batch, world in configs:
        cells = [padding_waste([[lengths[i] for i in s] for s in steps(lengths, batch, world, g)]) for g in (False, True)]
        print(f"| {batch} x {world} | {cells[0]:.1%} | {cells[1]:.1%} |")


def train_throughput(lengths: list[int], batch: int, n_steps: int, threads: int) -> None:
    """Real tokens/s of stage-2 steps (small LLaMA, bf16) on shuffled vs grouped batches, interleaved."""
    from ibllm import tuning
    from ibllm.config import llama_preset
    from ibllm.lit import make_adamw
    from ibllm.models.ibllm import ImageBindLLM, loss_positions, selected_lm_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = llama_preset("tiny", dim=256, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=32000, multiple_of=64,
                       max_seq_len=512, visual_dim=1024)
    model = ImageBindLLM(cfg, stage="finetune")
    tuning.cast_frozen(model, torch.bfloat16)
    optimizer = make_adamw(tuning.optimizer_groups(model, "finetune", 0.02), lr=1e-5, betas=(0.9, 0.95))
    runs = {g: steps(lengths, batch, 1, g, seed=1)[:n_steps] for g in (False, True)}
    totals = {g: [0, 0.0] for g in runs}
    for k in range(n_steps):
        for grouped, all_steps in runs.items():
            lens = [lengths[i] for i in all_steps[k]]
            width = max(lens)
            tokens = torch.randint(3, cfg.vocab_size, (len(lens), width))
            labels = tokens.clone()
            for row, n in enumerate(lens):
                tokens[row, n:] = 0
                labels[row, n:] = -100
            labels[:, :min(lens) // 3] = -100
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = selected_lm_loss(model(tokens, feature=torch.randn(len(lens), 1024),
                                              logits_at=loss_positions(labels)), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            totals[grouped][0] += sum(lens)
            totals[grouped][1] += time.perf_counter() - start
    rates = {g: t[0] / t[1] for g, t in totals.items()}
    print(f"\nstage-2 steps on the mix (LLaMA dim {cfg.dim} x {cfg.n_layers} layers, bf16, batch {batch}, "
          f"{n_steps} steps each, {threads} thread(s)): real tokens/s shuffled {rates[False]:.0f}, "
          f"grouped {rates[True]:.0f} ({rates[True] / rates[False]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true", help="also time stage-2 steps on the mix")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    waste_table("demo instructions (experiments/demo_finetune.yaml: batch 8, 1 process)", demo_lengths(),
                [(8, 1), (16, 1)])
    mix = mix_lengths()
    waste_table("Alpaca/LLaVA-like mix (experiments/finetune_7b.yaml: batch 1 x 32 GPUs)", mix,
                [(1, 32), (4, 8), (8, 1)])
    if args.train:
        train_throughput(mix_lengths(scale=0.01), 8, args.steps, args.threads)


if __name__ == "__main__":
    main()
