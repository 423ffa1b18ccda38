"""HTTP API benchmark (prints figures; not a test): requests/s and completion tokens/s of
``python -m ibllm serve --api`` at 1, 4 and 16 concurrent clients, batched serving (``--max-batch 16``)
against one-at-a-time serving (``--max-batch 1``), on the demo-size model.

Model: the trained demo checkpoint when ``make pretrain`` / ``make finetune`` have run (``runs/demo_*``,
``data/demo/encoder.safetensors``); otherwise SmolLM2-135M-Instruct with a random stage-1 adapter and a
random ``demo`` vision tower (same shapes and cost, meaningless answers). Every request carries one
224x224 image (base64) and a different question, greedy, ``max_tokens`` new tokens at most (a row stops
early at EOS; tokens/s counts the tokens actually returned, from ``usage``). Each client sends its
requests one after another; the clock runs from the first request to the last answer. Both servers run
side by side and the two modes alternate run by run (``--reps`` each, the best reported with the median),
so that load from other processes on a shared machine falls on both alike.

    python bench/bench_server.py [--max-tokens 32] [--requests-per-client 2] [--reps 2] [--json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["Describe the image.", "Which digit is this?", "What colour is the background?", "Is the digit even?",
             "Write one sentence about the picture.", "What do you see?", "Name the number shown.",
             "How many strokes does the digit have?"]


def demo_model(root: Path) -> tuple[list[str], str]:
    """Model flags for the server and a description: the real demo checkpoint, else a random stage-1 adapter."""
    for ckpt in (REPO / "runs/demo_finetune/checkpoints/last.ckpt", REPO / "runs/demo_pretrain/checkpoints/last.ckpt"):
        enc = REPO / "data/demo/encoder.safetensors"
        if ckpt.is_file() and enc.is_file():
            return ["--adapter", str(ckpt), "--imagebind", str(enc)], f"demo checkpoint {ckpt.relative_to(REPO)}"
    from ibllm import tuning  # lightning and the model code: only when a random adapter must be built
    from ibllm.checkpoints import save_atomic
    from ibllm.config import imagebind_preset
    from ibllm.lit import PretrainModule
    from ibllm.models.imagebind import build_imagebind

    torch.manual_seed(0)
    enc = root / "encoder.safetensors"
    save_atomic(dict(build_imagebind(imagebind_preset("demo"), modalities=["vision"]).state_dict()), enc)
    module = PretrainModule(llm="smollm2-135m-instruct", imagebind="demo", imagebind_weights=str(enc))
    module.configure_model()
    with torch.no_grad():
        for _, p in tuning.trainable_parameters(module.model, "pretrain"):
            p.normal_(0, 0.02)
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    ckpt["hyper_parameters"] = dict(module.hparams)
    path = root / "stage1.ckpt"
    torch.save(ckpt, path)
    return ["--adapter", str(path), "--imagebind", str(enc)], "random stage-1 adapter (no demo checkpoint here)"


def image_part(seed: int) -> dict:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


class Server:
    """The API server as a subprocess (stopped by its pid)."""

    def __init__(self, model_args: list[str], max_batch: int, port: int, log: Path) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "ibllm", "serve", "--api", *model_args, "--llama", "smollm2-135m-instruct",
               "--imagebind-preset", "demo", "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "256"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({log})")
            try:
                urllib.request.urlopen(f"{self.base}/health", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"server did not start ({log})")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def run_level(base: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """``clients`` threads each sending ``per_client`` requests in turn; throughput over the whole run."""
    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            barrier.wait()
            for j in range(per_client):
                k = index * per_client + j
                parts = [{"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]}, image_part(k)]
                body = {"model": "ibllm", "temperature": 0, "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": parts}]}
                t0 = time.perf_counter()
                r = http.post(f"{base}/v1/chat/completions", json=body)
                r.raise_for_status()
                with lock:
                    results.append((time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "wall_s": round(wall, 2),
            "requests_per_s": round(len(results) / wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "mean_latency_s": round(statistics.mean(s for s, _ in results), 2), "completion_tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--reps", type=int, default=2, help="runs per cell; the best is reported (shared machines)")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    modes = (("one at a time", 1), ("batched", 16))
    report = {"max_tokens": args.max_tokens, "reps": args.reps, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_args, described = demo_model(Path(tmp))
        report["model"] = described
        servers = {}
        try:  # both servers stay up; the modes alternate run by run, so load from elsewhere hits both alike
            for i, (mode, max_batch) in enumerate(modes):
                servers[mode] = Server(model_args, max_batch, args.port + i, Path(tmp) / f"server_{max_batch}.log")
                run_level(servers[mode].base, 1, 1, args.max_tokens)  # warm-up
            for clients in levels:
                per_client = max(args.requests_per_client, 4 // clients)
                runs: dict[str, list[dict]] = {mode: [] for mode, _ in modes}
                for _ in range(args.reps):
                    for mode, _ in modes:
                        runs[mode].append(run_level(servers[mode].base, clients, per_client, args.max_tokens))
                        print(json.dumps({"mode": mode, **runs[mode][-1]}), file=sys.stderr, flush=True)
                for mode, _ in modes:
                    best = max(runs[mode], key=lambda r: r["requests_per_s"])
                    report["runs"].append({"mode": mode, **best, "median_requests_per_s":
                                           round(statistics.median(r["requests_per_s"] for r in runs[mode]), 3)})
        finally:
            for server in servers.values():
                server.stop()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"model: {report['model']}; greedy, max_tokens {args.max_tokens}, one image per request, "
          f"best of {args.reps}")
    print("| serving | clients | requests | requests/s (median) | completion tokens/s | mean latency (s) |")
    print("|---|---|---|---|---|---|")
    for r in report["runs"]:
        print(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} "
              f"({r['median_requests_per_s']:.2f}) | {r['tokens_per_s']:.1f} | {r['mean_latency_s']:.2f} |")


if __name__ == "__main__":
    main()
