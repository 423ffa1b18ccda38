"""Validate a GPU in minutes: ``make gpu-check`` (one CUDA device) or ``make gpu-check CPU=1`` (tiny shapes, CPU).

Parts, each in its own process with its own time budget (a part that runs over is killed and reported as
``timeout``; the next part still runs, and the whole check stays under ``--total`` seconds):

* ``parity``: the device, then greedy ids of a tiny model under the device's bf16 autocast (frozen weights
  bf16, as training stores them) against the same model in fp32 on the CPU; a divergence is accepted only
  where the fp32 top-2 logit margin is below the measured logit error (a near-tie).
* ``train_plain``, ``train_fsdp``: stage 1 and stage 2 at the 7B shape and the configured micro-batches
  (random weights, training from precomputed features), frozen weights bf16, trainables fp32, bf16 autocast,
  AdamW; with and without activation checkpointing; the plain module, then FSDP2
  (``ibllm.distributed.shard_model``) over a one-process group. Step time, tokens/s, peak
  memory, and MFU counting 6·N FLOPs per token for trained and 4·N for frozen parameters against the device's
  dense bf16 peak.
* ``decode``: greedy decode tokens/s at 7B with the KV cache, batch 1 and 8.
* ``encoder``: ImageBind-huge vision tower through the feature-extraction path (``ibllm.features.FeatureWriter``):
  images/s in bf16 and fp32 on ready tensors, and end to end on a generated JPEG shard.
* ``plan``: the README's memory plan (``bench/bench_memory.py``, activations measured on the CPU) for one
  GPU, set next to the measured peaks at the end.
* ``faiss``: index build and search (``ibllm.cache_build.index.build_index``) on 1M x 1024 clustered vectors,
  recall@10 against exact search; on the CPU cores unless the FAISS build has GPU support; skipped, and said
  so, when FAISS is not installed.

The last line printed is ``gpu_check: {...}`` (one JSON object); the same JSON is written to ``--out``
(default ``$OUT/gpu_check.json`` when ``OUT`` is set, else ``runs/gpu_check.json``). Exit status 1 when a part
failed or ran over.

    python bench/gpu_check.py                  # on a CUDA machine (budgets add up to under 8 minutes)
    python bench/gpu_check.py --cpu            # the same code at tiny shapes on the CPU (about a minute of CPU time)
    python bench/gpu_check.py --parts decode,faiss
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ibllm.atomic import write_text_atomic  # noqa: E402

GiB = 1024 ** 3
# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
BF16_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12))


@dataclass(frozen=True)
class Shapes:
    """Sizes of one mode (the GPU check or its CPU rehearsal)."""

    llama: str
    runs: dict[str, tuple[int, int]]  # stage -> (micro-batch, tokens), the configured 7B runs on the GPU
    warmup: int
    steps: int
    decode_prompt: int
    decode_new: int
    imagebind: str
    encoder_batch: int
    encoder_batches: int
    shard_images: int
    faiss_n: int
    faiss_dim: int
    faiss_queries: int
    faiss_exact_max: int
    plan_seq: dict[str, int] = field(default_factory=dict)  # tokens of the CPU activation measurement
    budgets: dict[str, float] = field(default_factory=dict)  # seconds per part
    total: float = 470.0


GPU = Shapes("7B", {"pretrain": (32, 96), "finetune": (1, 512)}, warmup=2, steps=4, decode_prompt=64,
             decode_new=64, imagebind="huge", encoder_batch=64, encoder_batches=4, shard_images=512,
             faiss_n=1_000_000, faiss_dim=1024, faiss_queries=1000, faiss_exact_max=50_000,
             plan_seq={"pretrain": 96, "finetune": 128},
             budgets={"parity": 40, "train_plain": 75, "train_fsdp": 90, "decode": 45, "encoder": 55, "plan": 35,
                      "faiss": 120}, total=470)
CPU = Shapes("tiny", {"pretrain": (2, 16), "finetune": (1, 32)}, warmup=1, steps=2, decode_prompt=8, decode_new=8,
             imagebind="tiny", encoder_batch=4, encoder_batches=2, shard_images=8, faiss_n=20_000, faiss_dim=64,
             faiss_queries=100, faiss_exact_max=1_000, plan_seq={"pretrain": 32, "finetune": 32},
             budgets={}, total=750)
PARTS = ("parity", "train_plain", "train_fsdp", "decode", "encoder", "plan", "faiss")
CPU_PART_BUDGET = 150.0  # per part in --cpu mode: generous for a loaded 2-core machine (a part takes 5-45 s there)


# ------------------------------------------------------------------------------------------------------------
# Parts (each runs in a child process: ``gpu_check.py --part NAME --result FILE``). torch and the project's
# modules are imported inside each part: the parent stays light, and a broken import fails only its own part.
# ------------------------------------------------------------------------------------------------------------
class Part:
    """What a child part has: its device, shapes, progress printing and incremental result file."""

    def __init__(self, name: str, cpu: bool, result_file: str) -> None:
        import torch

        self.name, self.cpu, self.result_file = name, cpu, result_file
        self.shapes = CPU if cpu else GPU
        if not cpu and not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible: run with --cpu for the CPU rehearsal")
        self.device = torch.device("cpu") if cpu else torch.device("cuda", 0)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.start = time.perf_counter()
        self.result: dict[str, Any] = {}

    def say(self, text: str) -> None:
        """One progress line (the parent prefixes it with the part's name)."""
        print(f"{time.perf_counter() - self.start:6.1f}s  {text}", flush=True)

    def record(self, key: str, value: Any) -> None:
        """Add ``key`` to the part's result and rewrite the result file (so a killed part keeps what it had)."""
        self.result[key] = value
        write_text_atomic(self.result_file, json.dumps(self.result))

    def sync(self) -> None:
        """Wait for the device."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


def device_info(part: Part) -> dict[str, Any]:
    """Torch, CUDA and device facts (name, memory, dense bf16 peak used for MFU)."""
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
                            "device": "cpu", "bf16_peak_tflops": None}
    if part.device.type == "cuda":
        props = torch.cuda.get_device_properties(part.device)
        info.update(device=props.name, memory_gib=round(props.total_memory / GiB, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
        peak = bf16_peak(props.name)
        info["bf16_peak_tflops"] = None if peak is None else peak / 1e12
    return info


def bf16_peak(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device by its name (None when unknown)."""
    return next((flops for key, flops in BF16_PEAK_FLOPS if key in name), None)


def run_parity(part: Part) -> None:
    """Greedy ids under the device's bf16 autocast vs fp32 on the CPU, tiny model."""
    import copy

    import torch

    from ibllm import tuning
    from ibllm.config import llama_preset
    from ibllm.generation import generate_tokens
    from ibllm.models.ibllm import ImageBindLLM

    part.record("env", device_info(part))
    part.say(f"device: {part.result['env']['device']}, torch {torch.__version__}")
    cfg = llama_preset("tiny")
    torch.manual_seed(0)
    reference = ImageBindLLM(cfg, stage="finetune").eval()
    with torch.no_grad():  # zero-initialised gates and LoRA B would hide the visual path and LoRA
        for _, p in tuning.trainable_parameters(reference, "finetune"):
            p.add_(torch.randn_like(p) * 0.05)
        for name, p in reference.named_parameters():
            if "gate" in name:
                p.normal_(0, 0.5)
    feature = torch.randn(2, cfg.visual_dim, generator=torch.Generator().manual_seed(1))
    prompts = [[1, 17, 29, 31, 5, 9], [1, 44, 3]]  # unequal lengths: the padded batch path
    new = 24
    test = copy.deepcopy(reference).to(part.device)  # cast outside inference mode, as a model is at load time
    tuning.cast_frozen(test, torch.bfloat16)
    with torch.inference_mode():
        ids_ref = generate_tokens(reference, prompts, reference.visual_token(feature=feature), max_gen_len=new,
                                  temperature=0, eos_id=2)
        visual = test.visual_token(feature=feature.to(part.device))
        ids_dev = generate_tokens(test, prompts, visual, max_gen_len=new, temperature=0, eos_id=2)
        # Teacher-forced logits of both models on the reference sequences: the error and the fp32 margins.
        worst_diff, near_tie_ok, agree = 0.0, True, []
        for row, prompt in enumerate(prompts):
            seq = torch.tensor([prompt + ids_ref[row]])
            logits_ref = reference(seq, feature=feature[row:row + 1])[0, len(prompt) - 1:-1].float()
            with torch.autocast(part.device.type, dtype=torch.bfloat16):
                logits_dev = test(seq.to(part.device), feature=feature[row:row + 1].to(part.device))
            logits_dev = logits_dev[0, len(prompt) - 1:-1].float().cpu()
            diff = float((logits_ref - logits_dev).abs().max())
            worst_diff = max(worst_diff, diff)
            same = [a == b for a, b in zip(ids_ref[row], ids_dev[row])]
            first = same.index(False) if False in same else len(same)
            agree.append(first)
            if first < len(same):
                top2 = logits_ref[first].topk(2).values
                margin = float(top2[0] - top2[1])
                near_tie_ok &= margin <= 2 * diff
                part.say(f"row {row}: first divergence at new token {first}, fp32 margin {margin:.4f}, "
                         f"max logit error {diff:.4f}")
    match = ids_ref == ids_dev
    part.record("parity", {"match": match, "agree_tokens": agree, "new_tokens": new, "max_logit_diff": round(worst_diff, 5),
                           "ok": match or near_tie_ok, "device_dtype": "bf16 autocast", "reference": "cpu fp32"})
    part.say(f"greedy ids {'match' if match else 'differ'} (agreeing tokens per row {agree}), "
             f"max |logit diff| {worst_diff:.4f}")
    if not (match or near_tie_ok):
        raise SystemExit("greedy ids differ beyond a near-tie")


def single_process_mesh(part: Part) -> Any:
    """A one-process group (NCCL on CUDA, gloo on the CPU) and its 1-D ``data_parallel`` mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        extra = {"device_id": part.device} if part.device.type == "cuda" else {}
        backend = "nccl" if part.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **extra)
    return init_device_mesh(part.device.type, (1,), mesh_dim_names=("data_parallel",))


def train_config(part: Part, stage: str, wrap: str, checkpointing: bool) -> dict[str, Any]:
    """Build the model, take warm-up then timed training steps; times, memory, MFU."""
    import gc

    import torch

    from ibllm import tuning
    from ibllm.config import llama_preset
    from ibllm.models.ibllm import ImageBindLLM, lm_loss

    shapes, device = part.shapes, part.device
    if device.type == "cuda":  # what an earlier configuration (or its out-of-memory error) left
        gc.collect()
        torch.cuda.empty_cache()
    cfg = llama_preset(shapes.llama)
    torch.manual_seed(0)
    with torch.device(device):
        model = ImageBindLLM(cfg, stage=stage)
    counts = tuning.count_parameters(model, stage)
    tuning.cast_frozen(model, torch.bfloat16)
    if wrap == "fsdp":
        from ibllm.distributed import shard_model  # imports lightning: only the FSDP part pays for it

        shard_model(model, single_process_mesh(part), torch.bfloat16, torch.float32,
                    activation_checkpointing=checkpointing)
    elif checkpointing:  # what shard_model(activation_checkpointing=True) does to each block
        from torch.utils.checkpoint import checkpoint

        for block in model.llama.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    model.train()
    from ibllm.lit import make_adamw  # imports lightning; training's own AdamW choice (fused where supported)

    optimizer = make_adamw(tuning.optimizer_groups(model, stage, 0.05), lr=1e-5, betas=(0.9, 0.95))
    batch, seq = shapes.runs[stage]
    tokens = torch.randint(3, cfg.vocab_size, (batch, seq), device=device)
    feature = torch.randn(batch, cfg.visual_dim, device=device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = lm_loss(model(tokens, feature=feature), tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # synchronises

    losses = [step() for _ in range(shapes.warmup)]  # the first step creates the AdamW states
    static = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(shapes.steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    frozen = counts["total"] - counts["trainable"]
    flops = batch * seq * (6 * counts["trainable"] + 4 * frozen)
    peak_flops = bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    out = {"stage": stage, "wrap": wrap, "checkpointing": checkpointing, "micro_batch": batch, "seq": seq,
           "step_s": round(step_s, 4), "tokens_per_s": round(batch * seq / step_s, 1),
           "trainable": counts["trainable"], "frozen": frozen, "tflops_per_s": round(flops / step_s / 1e12, 2),
           "mfu": None if peak_flops is None else round(flops / step_s / peak_flops, 4),
           "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
           "finite": all(map(math.isfinite, losses)), "fused_adamw": bool(optimizer.defaults.get("fused"))}
    if device.type == "cuda":
        out.update(static_gib=round(static / GiB, 2), peak_gib=round(torch.cuda.max_memory_allocated() / GiB, 2),
                   reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 2))
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run_train(part: Part, wrap: str) -> None:
    """Both stages, each with and without activation checkpointing, each recorded as soon as measured."""
    import torch

    failed = []
    for stage, checkpointing in ((s, c) for s in GPU.runs for c in (False, True)):
        key = f"{stage}/checkpointing={checkpointing}"
        part.say(f"{stage} {wrap}, activation checkpointing {checkpointing}: building and stepping")
        try:
            row = train_config(part, stage, wrap, checkpointing)
        except torch.cuda.OutOfMemoryError as e:  # report and go on with the other setting
            row = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            failed.append(key)
        part.record(key, row)
        part.say(", ".join(f"{k} {v}" for k, v in row.items() if k in ("step_s", "tokens_per_s", "mfu", "peak_gib",
                                                                        "static_gib", "error")))
        if "finite" in row and not row["finite"]:
            failed.append(f"{key}: non-finite loss")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def run_decode(part: Part) -> None:
    """Greedy decode tokens/s with the KV cache (frozen weights bf16, autocast), batch 1 and 8."""
    import torch

    from ibllm import tuning
    from ibllm.config import llama_preset
    from ibllm.generation import generate_tokens
    from ibllm.models.ibllm import ImageBindLLM

    shapes = part.shapes
    cfg = llama_preset(shapes.llama)
    torch.manual_seed(0)
    part.say(f"building {shapes.llama} (stage-2 model, LoRA included)")
    with torch.device(part.device):
        model = ImageBindLLM(cfg, stage="finetune").eval()
    tuning.cast_frozen(model, torch.bfloat16)
    for batch in (1, 8):
        prompts = torch.randint(3, cfg.vocab_size, (batch, shapes.decode_prompt)).tolist()
        with torch.inference_mode():
            visual = model.visual_token(feature=torch.randn(batch, cfg.visual_dim, device=part.device))
            generate_tokens(model, prompts, visual, max_gen_len=4, temperature=0, eos_id=-1)  # warm-up
            part.sync()
            start = time.perf_counter()
            out = generate_tokens(model, prompts, visual, max_gen_len=shapes.decode_new, temperature=0, eos_id=-1)
            part.sync()
        elapsed = time.perf_counter() - start
        tokens = sum(map(len, out))
        row = {"batch": batch, "prompt": shapes.decode_prompt, "new_tokens": shapes.decode_new,
               "tokens_per_s": round(tokens / elapsed, 1), "ms_per_step": round(1000 * elapsed / shapes.decode_new, 2)}
        part.record(f"batch{batch}", row)
        part.say(f"batch {batch}: {row['tokens_per_s']} tokens/s, {row['ms_per_step']} ms per step")


def jpeg_shard(path: Path, count: int, size: int) -> None:
    """A WebDataset tar of ``count`` JPEG images (smooth colour fields with noise) with captions."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, size, dtype=np.float32)
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            colour = rng.random((1, 1, 3), dtype=np.float32)
            pixels = (grid[:, None, None] * colour + grid[None, :, None] * (1 - colour)) * 200
            pixels = pixels + rng.normal(0, 12, (size, size, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            for name, data in ((f"{i:06d}.jpg", buf.getvalue()), (f"{i:06d}.txt", f"image {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def run_encoder(part: Part) -> None:
    """ImageBind vision tower images/s through ``FeatureWriter``: ready tensors (bf16, fp32), then a JPEG shard."""
    import torch

    from ibllm.config import imagebind_preset
    from ibllm.features import FeatureWriter
    from ibllm.models.imagebind import build_imagebind

    shapes = part.shapes
    cfg = imagebind_preset(shapes.imagebind)
    torch.manual_seed(0)
    part.say(f"building ImageBind-{shapes.imagebind} vision tower")
    encoder = build_imagebind(cfg, ["vision"], device=part.device)
    workers = min(16, os.cpu_count() or 1)
    images = torch.randn(shapes.encoder_batch, 3, cfg.image_size, cfg.image_size)
    for precision in ("bf16", "fp32"):
        writer = FeatureWriter(encoder, cfg.image_size, shapes.encoder_batch, part.device, "float16", precision, workers)
        writer.encode(images)  # warm-up
        part.sync()
        start = time.perf_counter()
        for _ in range(shapes.encoder_batches):
            writer.encode(images)  # copies to the device and back, as extraction does
        elapsed = time.perf_counter() - start
        writer.close()
        rate = shapes.encoder_batch * shapes.encoder_batches / elapsed
        part.record(f"tensors_{precision}", {"batch": shapes.encoder_batch, "images_per_s": round(rate, 1)})
        part.say(f"{precision}: {rate:.1f} images/s on ready tensors (batch {shapes.encoder_batch})")
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "images-000000.tar"
        jpeg_shard(shard, shapes.shard_images, 320 if not part.cpu else 64)
        writer = FeatureWriter(encoder, cfg.image_size, shapes.encoder_batch, part.device, "float16", "bf16", workers)
        report = writer.write_shard(str(shard), Path(tmp) / "features-000000.tar")
        writer.close()
    rate = report.encoded / max(report.seconds, 1e-9)
    part.record("shard_bf16", {"images": report.samples, "encoded": report.encoded, "workers": workers,
                               "images_per_s": round(rate, 1), "skipped": report.skipped})
    part.say(f"JPEG shard end to end (decode x{workers} threads + bf16 encoder): {rate:.1f} images/s")
    if report.encoded != shapes.shard_images:
        raise SystemExit(f"encoded {report.encoded} of {shapes.shard_images} images: {report.skipped}")


def run_plan(part: Part) -> None:
    """The README's memory plan rows for one GPU and for 32 (activation bytes measured on the CPU)."""
    from bench.bench_memory import measure_block_activations, plan

    for stage, (batch, seq) in GPU.runs.items():
        part.say(f"{stage}: measuring one 7B block's saved activations on the CPU ({part.shapes.plan_seq[stage]} tokens)")
        per_token = measure_block_activations(stage, seq=part.shapes.plan_seq[stage])
        one = plan(stage, 1, batch, seq, per_token)
        many = plan(stage, 32, batch, seq, per_token)
        part.record(stage, {"micro_batch": batch, "seq": seq, "activation_bytes_per_token_per_layer": round(per_token),
                            "plan_1gpu_gib": {k: round(v, 2) for k, v in one.items()},
                            "plan_32gpu_total_gib": {k: round(v, 2) for k, v in many.items() if k.startswith("TOTAL")}})


def clustered_vectors(n: int, dim: int, seed: int, device: Any) -> Any:
    """``n`` unit vectors ``[n,dim]`` (numpy float32) clustered like image embeddings, generated on ``device``.

    The same hierarchy as ``bench/bench_cache.py`` (shared mean, 64 super-clusters, n/50 clusters, n/5
    sub-clusters, noise), drawn with torch so that 1M x 1024 takes seconds rather than a minute.
    """
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def unit(m: int) -> Any:
        x = torch.randn(m, dim, generator=gen, device=device)
        return x / x.norm(dim=1, keepdim=True)

    def pick(m: int, k: int) -> Any:
        return torch.randint(0, k, (m,), generator=gen, device=device)

    mean, supers = unit(1)[0], unit(64)
    n_clusters, n_subs = max(n // 50, 1), max(n // 5, 1)
    clusters = supers[pick(n_clusters, 64)] + 0.8 * unit(n_clusters)
    subs = clusters[pick(n_subs, n_clusters)] + 0.6 * unit(n_subs)
    out = torch.empty(n, dim)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = 0.6 * mean + subs[pick(m, n_subs)] + torch.randn(m, dim, generator=gen, device=device) / dim ** 0.5
        out[s:s + m] = (x / x.norm(dim=1, keepdim=True)).cpu()
    return out.numpy()


def run_faiss(part: Part) -> None:
    """Index build (auto choice), search QPS and recall@10 against exact search."""
    try:
        import faiss
    except ImportError as e:
        part.record("skipped", f"FAISS is not installed here ({e}); carry a faiss-cpu wheel (make gpu-wheels)")
        part.say(part.result["skipped"])
        return
    import numpy as np

    from ibllm.cache import gpu_available
    from ibllm.cache_build.index import build_index, exact_knn, recall_at_k

    shapes = part.shapes
    n, dim, nq = shapes.faiss_n, shapes.faiss_dim, shapes.faiss_queries
    part.record("faiss", {"version": faiss.__version__, "threads": faiss.omp_get_max_threads(), "gpu": gpu_available()})
    part.say(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, GPU FAISS: {gpu_available()}; "
             f"generating {n} x {dim} vectors")
    data = clustered_vectors(n, dim, 0, part.device)
    rng = np.random.default_rng(1)
    queries = data[rng.choice(n, nq, replace=False)] + 0.025 * rng.standard_normal((nq, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    start = time.perf_counter()
    truth = exact_knn(queries, data, 10)
    exact_s = time.perf_counter() - start
    part.say(f"exact search of {nq} queries: {exact_s:.1f}s; building the index")
    start = time.perf_counter()
    result = build_index(data, None, None, index_type="auto", recall_target=0.95, n_queries=200,
                         exact_max=shapes.faiss_exact_max, show_progress=False)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    found = result.index.search(queries, 10)[1]
    search_s = time.perf_counter() - start
    row = {"n": n, "dim": dim, "queries": nq, "factory": result.choice.factory, "search_params": result.search_params,
           "build_s": round(build_s, 1), "train_s": round(result.train_seconds, 1), "add_s": round(result.add_seconds, 1),
           "tune_s": round(result.tune_seconds, 1), "qps": round(nq / search_s, 1), "exact_qps": round(nq / exact_s, 1),
           "recall_at_10": round(recall_at_k(found, truth, 10), 4)}
    part.record("index", row)
    part.say(f"{row['factory']} {row['search_params']}: build {build_s:.1f}s, {row['qps']} QPS, "
             f"recall@10 {row['recall_at_10']}")


def run_part(name: str, cpu: bool, result_file: str) -> None:
    """Entry point of a child process."""
    part = Part(name, cpu, result_file)
    if name.startswith("train_"):
        run_train(part, name.removeprefix("train_"))
    else:
        handlers: dict[str, Callable[[Part], None]] = {"parity": run_parity, "decode": run_decode,
                                                       "encoder": run_encoder, "plan": run_plan, "faiss": run_faiss}
        handlers[name](part)


# ------------------------------------------------------------------------------------------------------------
# Parent: run the parts with budgets, compare, report
# ------------------------------------------------------------------------------------------------------------
def launch(name: str, cpu: bool, budget: float) -> dict[str, Any]:
    """Run one part in a child process for at most ``budget`` seconds, streaming its output."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--result", result_file]
        cmd += ["--cpu"] if cpu else []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=ROOT, start_new_session=True)
        tail: deque[str] = deque(maxlen=15)

        def pump() -> None:
            for line in proc.stdout:
                tail.append(line.rstrip())
                print(f"  [{name}] {line.rstrip()}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=budget)
            status = "ok" if proc.returncode == 0 else "error"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part's own process group (start_new_session)
            proc.wait()
            status = "timeout"
        reader.join(timeout=5)
        seconds = time.perf_counter() - start
        result = json.loads(Path(result_file).read_text()) if os.path.exists(result_file) else {}
    if status == "ok" and "skipped" in result:
        status = "skipped"
    entry: dict[str, Any] = {"status": status, "seconds": round(seconds, 1), "budget_s": round(budget, 1), **result}
    if status == "error":
        entry["error"] = [line for line in tail if line.strip()][-6:]
    return entry


def memory_vs_plan(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured peaks beside the plan for one GPU (minus the encoder row: the check trains from features;
    minus the FSDP gathered rows for the plain module)."""
    rows = []
    for stage in GPU.runs:
        plan = parts.get("plan", {}).get(stage, {}).get("plan_1gpu_gib")
        for wrap in ("plain", "fsdp"):
            measured = parts.get(f"train_{wrap}", {})
            for checkpointing in (False, True):
                got = measured.get(f"{stage}/checkpointing={checkpointing}", {})
                if "peak_gib" not in got or not plan:
                    continue
                total = plan["TOTAL with checkpointing" if checkpointing else "TOTAL without checkpointing"]
                total -= plan["ImageBind-H vision, replicated (bf16)"]
                if wrap == "plain":
                    total -= sum(v for k, v in plan.items() if k.startswith("FSDP gathered"))
                rows.append({"stage": stage, "wrap": wrap, "checkpointing": checkpointing,
                             "measured_peak_gib": got["peak_gib"], "plan_gib": round(total, 2)})
    return rows


def default_out() -> Path:
    """``$OUT/gpu_check.json`` when OUT is set (the GPU machine's return folder), else ``runs/gpu_check.json``."""
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else ROOT / "runs" / "gpu_check.json"


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts with their budgets; print and write the JSON report; 0 when every part passed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (rehearsal; what the test runs)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--out", default=None, help="JSON report (default: $OUT/gpu_check.json or runs/gpu_check.json)")
    parser.add_argument("--total", type=float, default=None, help="seconds for the whole check (default: 470 on GPU)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's budget")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help="one part's budget (repeatable), e.g. --budget faiss=300")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        run_part(args.part, args.cpu, args.result)
        return 0
    selected = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(selected) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    shapes = CPU if args.cpu else GPU
    budgets = {name: CPU_PART_BUDGET if args.cpu else shapes.budgets[name] for name in PARTS}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        budgets[name] = float(seconds)
    total = args.total or shapes.total
    out = Path(args.out) if args.out else default_out()
    print(f"gpu check ({'CPU rehearsal, tiny shapes' if args.cpu else 'GPU'}): {len(selected)} parts, "
          f"at most {total:.0f}s; report -> {out}", flush=True)
    start = time.perf_counter()
    parts: dict[str, Any] = {}
    for index, name in enumerate(selected, 1):
        budget = budgets[name] * args.budget_scale
        left = total - (time.perf_counter() - start)
        if left < min(15.0, budget):
            parts[name] = {"status": "skipped", "skipped": f"no time left ({left:.0f}s of {total:.0f}s)"}
            print(f"[{index}/{len(selected)}] {name}: skipped, {left:.0f}s left", flush=True)
            continue
        budget = min(budget, left)
        print(f"[{index}/{len(selected)}] {name} (budget {budget:.0f}s)", flush=True)
        parts[name] = launch(name, args.cpu, budget)
        print(f"[{index}/{len(selected)}] {name}: {parts[name]['status']} in {parts[name]['seconds']}s", flush=True)
    report = {"mode": "cpu" if args.cpu else "gpu", "env": parts.get("parity", {}).get("env"),
              "total_s": round(time.perf_counter() - start, 1), "parts": parts,
              "memory_vs_plan": memory_vs_plan(parts)}
    report["failed"] = [name for name, entry in parts.items() if entry["status"] in ("error", "timeout")]
    write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    print("gpu_check: " + json.dumps(report), flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
