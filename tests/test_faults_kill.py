"""kill -9 in the middle of checkpoint saves, with ``$TMPDIR`` on another filesystem (a tmpfs under /dev/shm,
the way a node-local /tmp differs from the shared run folder): no file under a final name is ever truncated,
nothing is left in ``$TMPDIR``, and the next start removes the hidden leftovers of the killed write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from faults_helpers import tiny_experiment

pytestmark = pytest.mark.system  # starts and kills training processes

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ROUNDS = 4


def hidden(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def assert_final_files_complete(folder: Path) -> None:
    for path in folder.glob("*.ckpt"):
        state = torch.load(path, weights_only=True, map_location="cpu")  # a truncated zip fails here
        assert state["ballast"].numel() == 16 << 20, f"{path} is incomplete"


def test_kill_during_saves_never_leaves_a_truncated_checkpoint(tmp_path, sp_model, caption_shards, cli_env):
    shm = Path("/dev/shm")
    assert shm.is_dir(), "this test needs a tmpfs at /dev/shm"
    with tempfile.TemporaryDirectory(dir=shm, prefix="ibllm-faults-") as tmpdir:
        assert os.stat(tmpdir).st_dev != os.stat(tmp_path).st_dev  # $TMPDIR on another filesystem
        env = cli_env(TMPDIR=tmpdir)
        env["PYTHONPATH"] = str(TESTS) + os.pathsep + env["PYTHONPATH"]
        ballast = {"class_path": "faults_helpers.SlowSave", "init_args": {"mb": 16}}
        config = tiny_experiment(tmp_path, sp_model, caption_shards, max_steps=10_000, every=1, callbacks=[ballast])
        ckpt = tmp_path / "ckpt"
        killed_mid_save = 0
        for _ in range(ROUNDS):
            left_before = hidden(ckpt)
            proc = subprocess.Popen([sys.executable, "-m", "ibllm", "fit", "--config", str(config)], cwd=REPO,
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.time() + 300
                leftovers_cleaned = not left_before
                while time.time() < deadline and proc.poll() is None:
                    current = hidden(ckpt)
                    if not leftovers_cleaned and not any(p in current for p in left_before):
                        leftovers_cleaned = True  # the new run removed the killed write's leftovers
                    writing = [p for p in current if f".tmp-{proc.pid}" in p.name]
                    if leftovers_cleaned and writing and (ckpt / "last.ckpt").exists():
                        proc.send_signal(signal.SIGKILL)  # in the middle of writing a checkpoint
                        killed_mid_save += 1
                        break
                    time.sleep(0.002)
            finally:
                proc.kill()
                err = proc.communicate()[1]
            assert proc.returncode == -signal.SIGKILL, err[-3000:]
            assert leftovers_cleaned, f"leftovers of the previous kill are still there: {left_before}"
            assert_final_files_complete(ckpt)
            assert not os.listdir(tmpdir), f"orphans in $TMPDIR: {os.listdir(tmpdir)}"
        assert killed_mid_save == ROUNDS

        # The next start cleans up and resumes; a clean finish leaves nothing hidden behind.
        step = int(torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"])
        done = subprocess.run([sys.executable, "-m", "ibllm", "fit", "--config", str(config), "--trainer.max_steps",
                               str(step + 1)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "removed" in done.stderr and "left by an interrupted checkpoint write" in done.stderr
        assert not hidden(ckpt) and not os.listdir(tmpdir)
        assert int(torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"]) == step + 1
        assert_final_files_complete(ckpt)
