"""Resume under faults, through ``python -m ibllm fit`` in subprocesses on a tiny stage-1 experiment:

* a failed resume (mistyped ``--ckpt_path``, truncated checkpoint) or a set-up error saves nothing and keeps
  the original error; the next correct command resumes the checkpoint with the most steps, and says so
  when it passes over a newer file with fewer;
* SIGTERM stops with a non-zero status and prints the exact command that resumes, which works;
* a divergence saves nothing diverged, names the last finite checkpoint and the command that resumes it
  with a lower lr and fresh optimizer state, which then trains on.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from faults_helpers import restored_from, tiny_experiment

pytestmark = pytest.mark.system  # every test here starts training processes

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def env_with_helpers(cli_env) -> dict[str, str]:
    env = cli_env()
    env["PYTHONPATH"] = str(TESTS) + os.pathsep + env["PYTHONPATH"]
    return env


def fit(cli_env, config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ibllm", "fit", "--config", str(config), *args], cwd=REPO,
                          env=env_with_helpers(cli_env), capture_output=True, text=True, timeout=timeout)


def step_of(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


def test_failed_resume_keeps_progress_and_resume_takes_the_most_steps(tmp_path, sp_model, caption_shards, cli_env):
    config = tiny_experiment(tmp_path, sp_model, caption_shards, max_steps=2)
    ckpt = tmp_path / "ckpt"
    first = fit(cli_env, config)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copy(ckpt / "last.ckpt", tmp_path / "step2.ckpt")
    second = fit(cli_env, config, "--trainer.max_steps", "4")  # resumes automatically
    assert second.returncode == 0, second.stderr[-3000:]
    assert step_of(ckpt / "last.ckpt") == 4

    # 1. A mistyped --ckpt_path: the run fails, saves nothing, the error names the path.
    bad = fit(cli_env, config, "--trainer.max_steps", "6", "--ckpt_path", str(ckpt / "lats.ckpt"))
    assert bad.returncode != 0 and "lats.ckpt" in bad.stderr
    assert "NoneType" not in bad.stderr and not (ckpt / "interrupted.ckpt").exists()
    # 2. A truncated checkpoint: same.
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((ckpt / "last.ckpt").read_bytes()[:5000])
    bad = fit(cli_env, config, "--trainer.max_steps", "6", "--ckpt_path", str(truncated))
    assert bad.returncode != 0 and "truncated.ckpt" in bad.stderr
    assert "NoneType" not in bad.stderr and not (ckpt / "interrupted.ckpt").exists()
    # 3. A set-up error (no data): the original error ends the output, not the checkpoint callback's.
    bad = fit(cli_env, config, "--trainer.max_steps", "6", "--data.init_args.train", str(tmp_path / "none-{0..1}.tar"))
    assert bad.returncode != 0 and "NoneType" not in bad.stderr and not (ckpt / "interrupted.ckpt").exists()
    assert step_of(ckpt / "last.ckpt") == 4

    # 4. A stale, newer file with fewer steps (as the old callback left): passed over, and said so.
    shutil.copy(tmp_path / "step2.ckpt", ckpt / "interrupted.ckpt")
    os.utime(ckpt / "interrupted.ckpt", (time.time() + 60, time.time() + 60))
    good = fit(cli_env, config, "--trainer.max_steps", "6")
    assert good.returncode == 0, good.stderr[-3000:]
    output = good.stdout + good.stderr
    assert restored_from(output) == [str(ckpt / "last.ckpt")]
    assert f"resuming from {ckpt / 'last.ckpt'} (global step 4), not from the newer file {ckpt / 'interrupted.ckpt'}" \
        in output
    assert step_of(ckpt / "last.ckpt") == 6 and not list(ckpt.glob("last-v*.ckpt"))


def test_sigterm_exits_non_zero_and_prints_the_resume_command(tmp_path, sp_model, caption_shards, cli_env):
    config = tiny_experiment(tmp_path, sp_model, caption_shards, max_steps=500, every=1)
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "ibllm", "fit", "--config", str(config)], cwd=REPO,
                            env=env_with_helpers(cli_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (ckpt / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be signalled"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    saved = ckpt / "interrupted.ckpt"
    assert "Interrupted by SIGTERM" in err and saved.exists()
    lines = err.splitlines()
    command = lines[lines.index(next(ln for ln in lines if ln.startswith("Saved ") and "Resume with:" in ln)) + 1]
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "ibllm", "fit"] and words[-2:] == ["--ckpt_path", str(saved)]
    step = step_of(saved)
    assert step >= 2
    resumed = subprocess.run([sys.executable, *words[1:], "--trainer.max_steps", str(step + 2)], cwd=REPO,
                             env=env_with_helpers(cli_env), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert restored_from(resumed.stdout + resumed.stderr) == [str(saved)]
    assert step_of(ckpt / "last.ckpt") == step + 2


def test_divergence_saves_nothing_diverged_and_resumes_with_a_new_lr(tmp_path, sp_model, caption_shards, cli_env):
    poison = {"class_path": "faults_helpers.PoisonWhenLrAbove", "init_args": {"step": 3, "threshold": 1e-3}}
    config = tiny_experiment(tmp_path, sp_model, caption_shards, max_steps=6, every=1, callbacks=[poison])
    ckpt = tmp_path / "ckpt"
    run = fit(cli_env, config)
    assert run.returncode != 0
    # caught at the step the weights went non-finite: steps 1-2 were saved, step 3 never was
    assert "non-finite trainable weights after the optimizer step to global step 3" in run.stderr
    assert not (ckpt / "interrupted.ckpt").exists()
    for path in ckpt.glob("*.ckpt"):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values()), f"{path} holds diverged weights"
    assert step_of(ckpt / "last.ckpt") == 2
    lines = run.stderr.splitlines()
    where = next(i for i, ln in enumerate(lines) if ln.startswith("The last finite checkpoint is"))
    assert f"{ckpt / 'last.ckpt'} (global step 2)" in lines[where]
    words = shlex.split(lines[where + 1])
    assert words[-6:] == ["--ckpt_path", str(ckpt / "last.ckpt"), "--model.init_args.lr", "0.0005",
                          "--model.init_args.reset_optimizer", "true"]
    resumed = subprocess.run([sys.executable, *words[1:]], cwd=REPO, env=env_with_helpers(cli_env),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = next(ln for ln in resumed.stdout.splitlines() if ln.startswith("train start:"))
    assert start.startswith("train start: step 2 ") and "peak 0.0005 moments 0" in start
    assert step_of(ckpt / "last.ckpt") == 6
