"""Peak host memory per rank of building an FSDP2-sharded ImageBindLLM: whole model first vs the meta device.

    python bench/bench_meta_init.py [--dim 1024 --layers 8 --vocab 32000 --world 2 --stage pretrain]

Writes a random Meta-layout LLaMA (``params.json`` + one bf16 ``consolidated.00.pth``) to a temporary folder,
then, for each mode, starts ``--world`` gloo processes that do what ``ImageBindLLMModule.configure_model``
does under FSDP2 (frozen weights in bf16, tiny ImageBind encoder):

* ``whole``: :func:`ibllm.build.build_model` (every rank builds and loads the whole model in fp32), cast the
  frozen weights, :func:`ibllm.distributed.shard_model` (``model.meta_init: false``);
* ``meta``: :func:`ibllm.build.build_model_on_meta`, cast, shard, :func:`ibllm.build.finish_on_meta` (each rank
  allocates and reads only its shards, the file memory-mapped).

Each rank reports its peak resident set (``ru_maxrss``, which counts the mapped file pages it touched), the
resident set after imports (the floor), the bytes of parameters it holds, and the build time. The last line
is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ibllm import tuning  # noqa: E402
from ibllm.build import build_model, build_model_on_meta, finish_on_meta  # noqa: E402
from ibllm.checkpoints.io import llama_shapes  # noqa: E402
from ibllm.checkpoints.meta import save_meta_llama  # noqa: E402
from ibllm.config import LLaMAConfig  # noqa: E402

MODES = ("whole", "meta")


def rss_mb() -> float:
    """Current resident set of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_base(folder: Path, dim: int, layers: int, vocab: int) -> LLaMAConfig:
    """A random bf16 Meta-layout LLaMA in ``folder`` (kept when it is already there)."""
    cfg = LLaMAConfig(dim=dim, n_layers=layers, n_heads=dim // 64, vocab_size=vocab, multiple_of=256)
    if not (folder / "consolidated.00.pth").is_file():
        g = torch.Generator().manual_seed(0)
        sd = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in llama_shapes(cfg).items()}
        save_meta_llama(cfg, sd, folder)
    return cfg


def worker(args: argparse.Namespace) -> None:
    """One rank: build, shard and materialise in ``args.mode``; print one JSON line."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ibllm.distributed import shard_model

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
    floor = rss_mb()
    start = time.perf_counter()
    if args.mode == "whole":
        model = build_model(args.llm, args.stage, "tiny", None, ["vision"], seed=0)
        tuning.cast_frozen(model, torch.bfloat16)
        shard_model(model, mesh)
    else:
        model, deferred = build_model_on_meta(args.llm, args.stage, "tiny", None, ["vision"], seed=0)
        tuning.cast_frozen(model, torch.bfloat16)
        shard_model(model, mesh)
        finish_on_meta(model, deferred, "cpu")
    seconds = time.perf_counter() - start
    held = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.llama.parameters())
    dist.barrier()
    print(json.dumps({"mode": args.mode, "rank": dist.get_rank(), "peak_rss_mib": round(peak_rss_mb()),
                      "rss_after_imports_mib": round(floor), "llama_bytes_held_mib": round(held / 2**20),
                      "seconds": round(seconds, 1)}), flush=True)
    dist.destroy_process_group()


def free_port() -> int:
    """An unused local TCP port for the process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, llm: Path, args: argparse.Namespace) -> list[dict]:
    """Start ``args.world`` ranks of :func:`worker` and return their reports."""
    port, procs = str(free_port()), []
    for rank in range(args.world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(args.world), OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--llm", str(llm), "--stage", args.stage]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    reports = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{mode} rank exited with {p.returncode}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(reports, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--stage", default="pretrain", choices=tuning.STAGES)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--dir", default=None, help="folder for the generated LLaMA (default: a temporary one)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="meta", help=argparse.SUPPRESS)
    ap.add_argument("--llm", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp) / f"llama-{args.dim}x{args.layers}"
        cfg = write_base(folder, args.dim, args.layers, args.vocab)
        file_mib = (folder / "consolidated.00.pth").stat().st_size / 2**20
        params = sum(int(torch.Size(s).numel()) for s in llama_shapes(cfg).values())
        print(f"LLaMA dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}: {params / 1e6:.0f}M parameters, "
              f"consolidated.00.pth {file_mib:.0f} MiB (bf16); {args.world} gloo ranks, stage {args.stage}")
        results = {}
        for mode in args.modes:
            results[mode] = launch(mode, folder, args)
            for r in results[mode]:
                print(f"  {mode:5s} rank {r['rank']}: peak RSS {r['peak_rss_mib']:6d} MiB (after imports "
                      f"{r['rss_after_imports_mib']} MiB), LLaMA held {r['llama_bytes_held_mib']} MiB, "
                      f"{r['seconds']} s", flush=True)
    print(json.dumps({"bench_meta_init": {"dim": cfg.dim, "layers": cfg.n_layers, "vocab": cfg.vocab_size,
                                          "params_m": round(params / 1e6), "file_mib": round(file_mib),
                                          "world": args.world, "stage": args.stage, "ranks": results}}))


if __name__ == "__main__":
    main()
