"""Per-GPU memory plan of the 7B runs under FSDP2 (ibllm/distributed.py), printed as a table.

Parameter counts come from the real model classes built on the meta device. Activation bytes per token
and layer are *measured* on this machine's CPU: one 7B ``TransformerBlock`` (bf16 weights, bf16 autocast,
the visual injection on, LoRA in stage 2) runs forward on a short sequence and every tensor autograd saves
for backward is counted once (by storage). With activation checkpointing a block keeps only its input,
plus one block's activations while it is recomputed. ``--gpu`` also runs one real training step of the
full 7B on one CUDA device (unsharded, so frozen weights are whole there) and reports the measured peak
and the activation share, with and without checkpointing — record those in BENCHMARKS.md.

    python bench/bench_memory.py                 # analytic plan + CPU-measured activation sizes
    python bench/bench_memory.py --gpu           # + measured on a GPU
    python bench/bench_memory.py --gpus 32 --stage pretrain --micro-batch 32 --seq 96
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
from torch import nn

from ibllm import tuning
from ibllm.config import imagebind_preset, llama_preset

GiB = 1024 ** 3
# The configured runs (experiments/pretrain_7b.yaml, finetune_7b.yaml): micro-batch per GPU and token length.
RUNS = {"pretrain": {"micro_batch": 32, "seq": 96}, "finetune": {"micro_batch": 1, "seq": 512}}


@dataclass
class Counts:
    """Parameter counts of the 7B model of one stage."""

    llama_frozen: int
    block_frozen: int
    root_frozen: int  # embeddings, output, final norm (+ the frozen bind network in stage 2)
    trainable: int
    root_trainable: int  # bind network + prefix queries (stage 1): gathered with the root
    encoder: int


def count_parameters(stage: str) -> Counts:
    """Counts from the model classes on the meta device (no memory)."""
    from ibllm.models.ibllm import ImageBindLLM
    from ibllm.models.imagebind import imagebind_summary

    cfg = llama_preset("7B")
    with torch.device("meta"):
        model = ImageBindLLM(cfg, stage=stage)
    frozen = trainable = root_frozen = root_trainable = block = 0
    for name, p in model.named_parameters():
        n = p.numel()
        in_block = name.startswith("llama.layers.")
        if p.requires_grad:
            trainable += n
            root_trainable += 0 if in_block else n
        else:
            frozen += n
            root_frozen += 0 if in_block else n
            block += n if name.startswith("llama.layers.0.") else 0
    encoder = imagebind_summary("huge", ["vision"])["total_params"]
    return Counts(frozen, block, root_frozen, trainable, root_trainable, encoder)


def measure_block_activations(stage: str, seq: int = 96, checkpointing: bool = False) -> float:
    """Bytes autograd saves per token in one 7B block (bf16 weights, bf16 autocast), measured on CPU."""
    from ibllm.models.llama import AdapterState, TransformerBlock, rope_tables

    cfg = llama_preset("7B")
    torch.manual_seed(0)
    holder = nn.Module()
    holder.layers = nn.ModuleList([TransformerBlock(cfg, bias=stage == "finetune")])
    if stage == "finetune":
        tuning.add_lora(holder, cfg.lora_rank)
    for name, p in holder.named_parameters():
        train = ("gate" in name) if stage == "pretrain" else any(k in name for k in ("norm", "bias", "lora"))
        p.requires_grad_(train)
        if not train:
            p.data = p.data.to(torch.bfloat16)
    block = holder.layers[0]
    x = torch.randn(1, seq, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_tables(cfg.head_dim, seq, cfg.rope_theta)
    visual = torch.randn(1, 1, cfg.dim, requires_grad=True)
    seen: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in holder.parameters()}  # not activations

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and t.untyped_storage().nbytes() < 2 ** 27:  # < 128 MiB: no weight casts
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    def run() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            adapter = AdapterState(block.attention.adapter_state(visual).values)
            return block(x, cos, sin, adapter=adapter)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if checkpointing:
            from torch.utils.checkpoint import checkpoint

            out = checkpoint(run, use_reentrant=False)
        else:
            out = run()
    seen.pop(x.untyped_storage().data_ptr(), None)  # the block input is the previous block's output
    del out
    return sum(seen.values()) / seq


def plan(stage: str, gpus: int, micro_batch: int, seq: int, per_token_layer: float) -> dict[str, float]:
    """The per-GPU plan in GiB (see the README for the reasoning behind each row)."""
    c = count_parameters(stage)
    cfg = llama_preset("7B")
    tokens = micro_batch * seq
    bf16, fp32 = 2, 4
    rows: dict[str, float] = {}
    rows["frozen weights shard (LLaMA; + bind net in stage 2; bf16, /GPUs)"] = c.llama_frozen * bf16 / gpus / GiB
    rows["ImageBind-H vision, replicated (bf16)"] = c.encoder * bf16 / GiB
    rows["trainable fp32 shard: weights+grads+AdamW m,v (16 B/param, /GPUs)"] = c.trainable * 16 / gpus / GiB
    # FSDP working set: the root stays gathered through forward+backward (bf16), plus its bf16 gradients
    # before the reduce-scatter, plus two gathered blocks (the current one and the prefetched next one).
    rows["FSDP gathered: root (embeddings, output, bind net) bf16"] = (c.root_frozen + c.root_trainable) * bf16 / GiB
    rows["FSDP gathered: 2 blocks bf16 + root grads bf16"] = (2 * c.block_frozen + c.root_trainable) * bf16 / GiB
    logits = tokens * cfg.vocab_size * (bf16 + fp32 + fp32) / GiB  # bf16 logits, fp32 copy, fp32 grad
    rows["logits + loss (bf16 logits, fp32 copy and grad)"] = logits
    full = per_token_layer * tokens * cfg.n_layers / GiB
    residual = tokens * cfg.dim * bf16
    rows["activations, no checkpointing"] = full
    rows["activations, checkpointing (block inputs + 1 block recompute)"] = (residual * cfg.n_layers + per_token_layer * tokens) / GiB
    static = sum(v for k, v in rows.items() if not k.startswith("activations"))
    rows["TOTAL without checkpointing"] = static + full
    rows["TOTAL with checkpointing"] = static + rows["activations, checkpointing (block inputs + 1 block recompute)"]
    return rows


def gpu_measure(stage: str, micro_batch: int, seq: int, checkpointing: bool) -> dict[str, float]:
    """One real training step of the full 7B on one CUDA device (random weights; frozen bf16, trainables
    fp32, bf16 autocast): static memory, peak, and the difference (activations + transient buffers)."""
    from ibllm.distributed import _checkpoint_forward
    from ibllm.models.ibllm import ImageBindLLM, lm_loss

    cfg = llama_preset("7B")
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ImageBindLLM(cfg, stage=stage)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    tuning.cast_frozen(model, torch.bfloat16)
    if checkpointing:
        for block in model.llama.layers:
            _checkpoint_forward(block)
    optimizer = torch.optim.AdamW(tuning.optimizer_groups(model, stage, 0.05), lr=1e-5, fused=True)
    tokens = torch.randint(3, cfg.vocab_size, (micro_batch, seq), device=device)
    feature = torch.randn(micro_batch, cfg.visual_dim, device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lm_loss(model(tokens, feature=feature), tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates the AdamW states
    torch.cuda.synchronize()
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    result = {"static_gib": static / GiB, "peak_gib": peak / GiB, "step_extra_gib": (peak - static) / GiB}
    del model, optimizer
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=32)
    ap.add_argument("--stage", choices=("pretrain", "finetune", "both"), default="both")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the configured run's")
    ap.add_argument("--seq", type=int, default=None, help="default: the configured run's")
    ap.add_argument("--gpu", action="store_true", help="also measure one step on a CUDA device")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = {}
    for stage in (("pretrain", "finetune") if args.stage == "both" else (args.stage,)):
        mb = args.micro_batch or RUNS[stage]["micro_batch"]
        seq = args.seq or RUNS[stage]["seq"]
        per_token = measure_block_activations(stage, seq=min(seq, 128))
        rows = plan(stage, args.gpus, mb, seq, per_token)
        entry = {"gpus": args.gpus, "micro_batch": mb, "seq": seq,
                 "activation_bytes_per_token_per_layer": round(per_token), "plan_gib": rows}
        if args.gpu and torch.cuda.is_available():
            entry["measured_1gpu_unsharded"] = {f"checkpointing={ac}": gpu_measure(stage, mb, seq, ac)
                                                for ac in (False, True)}
        report[stage] = entry
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for stage, entry in report.items():
        print(f"\n7B {stage}: {entry['gpus']} GPUs, micro-batch {entry['micro_batch']} x {entry['seq']} tokens; "
              f"measured {entry['activation_bytes_per_token_per_layer']:,} activation bytes / token / layer (CPU)")
        for key, value in entry["plan_gib"].items():
            print(f"  {key:<70} {value:8.2f} GiB")
        for key, value in entry.get("measured_1gpu_unsharded", {}).items():
            print(f"  measured on one GPU, {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in value.items()))


if __name__ == "__main__":
    main()
