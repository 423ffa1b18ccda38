"""Checkpoint writes: save time of Lightning's writer vs ours, and what a kill -9 costs.

    python bench/bench_checkpoint_save.py [--mb 64 256] [--repeats 5] [--kills 6] [--intervals 5 20]

1. Save time of one checkpoint of ``--mb`` MiB (random bytes + a step count), median of ``--repeats``, with
   the target on this disk, for: Lightning's ``TorchCheckpointIO`` (buffer in memory, then a temporary file in
   ``$TMPDIR`` moved into place) with ``$TMPDIR`` on the same filesystem and on a tmpfs (/dev/shm, where the
   move becomes a copy), and :class:`ibllm.checkpoints.lightning_io.AtomicCheckpointIO` (written beside the
   target, fsync, rename).
2. kill -9 of a tiny training run (a child process, ``$TMPDIR`` on /dev/shm) that checkpoints every N steps,
   for each writer, at a random point of an interval or while a checkpoint is being written: steps lost
   (last step reached - step of ``last.ckpt``), truncated files under final names, orphans in ``$TMPDIR``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ibllm.checkpoints.lightning_io import AtomicCheckpointIO  # noqa: E402


def writer(name: str):
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    return AtomicCheckpointIO() if name == "atomic" else TorchCheckpointIO()


def time_saves(mb: int, repeats: int, folder: Path) -> dict[str, float]:
    """Median seconds per save for each writer / $TMPDIR placement."""
    checkpoint = {"global_step": 1, "ballast": torch.randint(0, 255, (mb << 20,), dtype=torch.uint8)}
    out = {}
    for label, name, tmpdir in (("lightning, TMPDIR same disk", "lightning", folder / "tmp"),
                                ("lightning, TMPDIR tmpfs", "lightning", Path("/dev/shm")),
                                ("ours (beside target + fsync)", "atomic", None)):
        if tmpdir is not None:
            tmpdir.mkdir(exist_ok=True)
            tempfile.tempdir = str(tmpdir)  # fsspec's temporary file goes through tempfile.mkstemp
        io = writer(name)
        times = []
        for i in range(repeats):
            target = folder / "ckpt" / "last.ckpt"
            start = time.perf_counter()
            io.save_checkpoint(checkpoint, target)
            times.append(time.perf_counter() - start)
        tempfile.tempdir = None
        out[label] = statistics.median(times)
    return out


# ---- child: a tiny training run that prints its steps ------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, Dataset

    from ibllm.lit import PretrainModule

    class Rows(Dataset):
        def __len__(self) -> int:
            return 10_000

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            tokens = torch.randint(3, 512, (12,), generator=g)
            return {"tokens": tokens, "labels": tokens.clone(), "image": torch.rand(3, 224, 224, generator=g),
                    "inject": torch.tensor(True)}

    class Steps(L.Callback):
        def on_train_batch_end(self, trainer, *rest) -> None:
            print(f"step {trainer.global_step}", flush=True)

        def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
            checkpoint["ballast"] = torch.zeros(args.ballast_mb << 20, dtype=torch.uint8)

    module = PretrainModule(llm="tiny", imagebind="tiny", lr=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_steps=100_000, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=args.root, plugins=[writer(args.writer)],
                        callbacks=[ModelCheckpoint(dirpath=os.path.join(args.root, "ckpt"), save_last=True,
                                                   every_n_train_steps=args.every), Steps()])
    trainer.fit(module, DataLoader(Rows(), batch_size=2))


def _writing(writer_name: str, ckpt: Path, tmpdir: str, pid: int) -> bool:
    """A checkpoint write of the child is in progress (its temporary file exists)."""
    if writer_name == "lightning":
        return bool(os.listdir(tmpdir))
    return ckpt.is_dir() and any(f".tmp-{pid}" in p.name for p in ckpt.iterdir())


def _read(proc: subprocess.Popen) -> str:
    """What the child printed since the last call (non-blocking)."""
    try:
        return (os.read(proc.stdout.fileno(), 1 << 16) or b"").decode()
    except BlockingIOError:
        return ""


def kill_trial(writer_name: str, every: int, root: Path, ballast_mb: int, moment: str) -> dict:
    """One run killed after its first checkpoint: at a random point of the next ``every`` steps
    (``moment="random"``) or as soon as a checkpoint write is in progress (``moment="save"``)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ckpt = root / "ckpt"
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="bench-ckpt-") as tmpdir:
        env = {**os.environ, "TMPDIR": tmpdir, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, __file__, "--child", "--writer", writer_name, "--every", str(every),
                                 "--root", str(root), "--ballast-mb", str(ballast_mb)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        os.set_blocking(proc.stdout.fileno(), False)
        last, first, target, buffer = 0, None, None, ""
        while proc.poll() is None:
            buffer += _read(proc)
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if line.startswith("step "):
                    last = int(line.split()[1])
            if first is None and (ckpt / "last.ckpt").exists():
                first = last
                target = first + random.randint(1, every)
            if first is not None and moment == "save" and last > first and _writing(writer_name, ckpt, tmpdir, proc.pid):
                time.sleep(random.uniform(0.0, 0.4))  # somewhere in the write (Lightning: often in the move)
                proc.send_signal(signal.SIGKILL)
            elif first is not None and moment == "random" and last >= target:
                time.sleep(random.uniform(0.0, 0.3))
                proc.send_signal(signal.SIGKILL)
            time.sleep(0.001)
        buffer += _read(proc)
        for line in buffer.split("\n"):
            if line.startswith("step "):
                last = int(line.split()[1])
        orphans = os.listdir(tmpdir)
        orphan_mb = sum(os.path.getsize(os.path.join(tmpdir, f)) for f in orphans) / 2**20
    truncated, saved = 0, None
    for path in ckpt.glob("*.ckpt"):
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
            if path.name == "last.ckpt":
                saved = int(state["global_step"])
        except Exception:  # noqa: BLE001 - any unreadable file under a final name counts
            truncated += 1
    return {"lost": None if saved is None else last - saved, "truncated": truncated, "orphans": len(orphans),
            "orphan_mb": orphan_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--intervals", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--ballast-mb", type=int, default=64, help="checkpoint size in the kill trials")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--writer", default="atomic", help=argparse.SUPPRESS)
    ap.add_argument("--every", type=int, default=5, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(dir=REPO, prefix=".bench-ckpt-") as work:
        work = Path(work)
        print("| checkpoint | " + " | ".join(["lightning, TMPDIR same disk", "lightning, TMPDIR tmpfs",
                                               "ours (beside target + fsync)"]) + " |")
        print("|---|---|---|---|")
        for mb in args.mb:
            times = time_saves(mb, args.repeats, work)
            print(f"| {mb} MiB | " + " | ".join(f"{t:.3f} s" for t in times.values()) + " |", flush=True)
        print()
        print("| writer | checkpoint every | killed | kills | steps lost (mean / max) | truncated files "
              "| orphans in TMPDIR |")
        print("|---|---|---|---|---|---|---|")
        random.seed(0)
        for moment in ("random", "save"):
            for every in args.intervals if moment == "random" else args.intervals[:1]:
                for name in ("lightning", "atomic"):
                    trials = [kill_trial(name, every, work / "run", args.ballast_mb, moment) for _ in range(args.kills)]
                    lost = [t["lost"] for t in trials if t["lost"] is not None]
                    print(f"| {name} | {every} | {'during a save' if moment == 'save' else 'any time'} | "
                          f"{len(trials)} | {statistics.mean(lost) if lost else float('nan'):.1f} / "
                          f"{max(lost) if lost else '-'} ({len(trials) - len(lost)} without a readable last.ckpt) | "
                          f"{sum(t['truncated'] for t in trials)} | {sum(t['orphans'] for t in trials)} "
                          f"({sum(t['orphan_mb'] for t in trials):.0f} MiB) |", flush=True)


if __name__ == "__main__":
    main()
