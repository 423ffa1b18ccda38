"""Multi-process training on real engines (gloo, 2 CPU processes started as subprocesses) and the batch
script rendering. Runs tests/dist_train.py; never starts a distributed strategy inside pytest."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "dist_train.py"

pytestmark = pytest.mark.system  # every test here starts processes


@pytest.fixture
def train(cli_env) -> Callable[..., dict]:
    """``train(tmp, name, *args)``: the tiny training in a subprocess; returns what rank 0 saved."""
    def run(tmp: Path, name: str, *args: str) -> dict:
        out = tmp / f"{name}.pt"
        result = subprocess.run([sys.executable, str(RUNNER), "--root", str(tmp / name), "--out", str(out), *args],
                                cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        return torch.load(out, weights_only=False)

    return run


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_ddp_and_fsdp2_match_one_process(tmp_path, train):
    """Same global batch (4 = 1 x 4 = 2 x 2): after 3 AdamW steps the trainable weights agree."""
    common = ("--stage", "pretrain", "--global-batch", "4", "--steps", "3")
    single = train(tmp_path, "single", "--strategy", "single", *common)
    ddp = train(tmp_path, "ddp", "--strategy", "ddp", "--devices", "2", *common)
    fsdp = train(tmp_path, "fsdp", "--strategy", "fsdp", "--devices", "2", *common)
    assert single["global_step"] == ddp["global_step"] == fsdp["global_step"] == 3
    moved = max(float(single["weights"][k].abs().max()) for k in single["weights"] if "gate" in k)
    assert moved > 1e-3  # the zero-initialised gates trained
    assert max_diff(single["weights"], ddp["weights"]) < 1e-5
    assert max_diff(single["weights"], fsdp["weights"]) < 1e-5
    # FSDP2 really sharded the LLaMA blocks and the root; the encoder stayed replicated.
    assert any(n.startswith("llama.layers.0.") for n in fsdp["sharded"]) and "llama.tok_embeddings.weight" in fsdp["sharded"]
    assert not any(n.startswith("image_bind.") for n in fsdp["sharded"])

    # The sharded checkpoint holds only trainable tensors; consolidation writes them (official + safetensors).
    from ibllm.checkpoints.adapters import read_adapter
    from ibllm.checkpoints.consolidate import consolidate, read_sharded_checkpoint

    ckpt = tmp_path / "fsdp" / "ckpt" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2
    state, meta = read_sharded_checkpoint(ckpt)
    assert set(state) == set(fsdp["weights"]) and meta["stage"] == "pretrain" and meta["base_fingerprint"]
    for fmt, name in (("official", "adapter.pth"), ("safetensors", "adapter.safetensors")):
        written = consolidate(ckpt, tmp_path / name, fmt)
        adapter = read_adapter(written)
        assert adapter.stage == "pretrain" and max_diff(adapter.state, fsdp["weights"]) == 0.0
        assert adapter.meta.get("base_fingerprint") == meta["base_fingerprint"]
    with pytest.raises(FileExistsError):
        consolidate(ckpt, tmp_path / "adapter.pth", "official")


def test_fsdp2_sharded_checkpoint_resumes_exactly(tmp_path, train):
    """Stage 2 (LoRA injected before sharding), frozen bf16 + fp32 trainables in one FSDP group, bf16 mixed
    precision, activation checkpointing: 2 steps, save, resume to 4 == 4 uninterrupted steps."""
    common = ("--strategy", "fsdp", "--devices", "2", "--stage", "finetune", "--precision", "bf16-mixed",
              "--frozen-dtype", "bfloat16", "--act-ckpt", "--rows", "4", "--global-batch", "4", "--steps", "4")
    straight = train(tmp_path, "straight", *common)
    first = train(tmp_path, "resumed", *common, "--stop-at", "2")
    assert first["global_step"] == 2
    resumed = train(tmp_path, "resumed", *common, "--resume", str(tmp_path / "resumed" / "ckpt" / "last.ckpt"))
    assert resumed["global_step"] == 4
    assert max_diff(first["weights"], straight["weights"]) > 1e-4  # steps 3-4 changed the weights ...
    assert max_diff(resumed["weights"], straight["weights"]) < 1e-6  # ... identically after the resume
    assert any("lora_A" in k for k in straight["weights"])

    from ibllm.checkpoints.adapters import read_adapter
    from ibllm.checkpoints.consolidate import consolidate

    written = consolidate(tmp_path / "resumed" / "ckpt" / "last.ckpt", tmp_path / "stage2.safetensors", "safetensors")
    assert max_diff(read_adapter(written).state, resumed["weights"]) == 0.0


def test_consolidate_refuses_bad_input(tmp_path, run_ibllm):
    from ibllm.checkpoints import CheckpointError
    from ibllm.checkpoints.consolidate import consolidate, read_sharded_checkpoint

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        read_sharded_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        consolidate(tmp_path / "missing", tmp_path / "x.pth")
    result = run_ibllm(["consolidate", tmp_path / "empty", "--out", tmp_path / "x.pth"])
    assert result.returncode == 1 and "not a sharded checkpoint" in result.stderr


def test_sbatch_script_renders_and_make_only_submits_outside_an_allocation(tmp_path, cli_env):
    from ibllm.slurm import build_script

    script, log_dir = build_script("experiments/pretrain_7b.yaml", 4, 8, ["--trainer.max_steps", "5"], partition="gpu",
                                   time_limit="2-00:00:00", account="proj", workdir=REPO)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2-00:00:00", "#SBATCH --account=proj",
                 "#SBATCH --gres=gpu:8", f"#SBATCH --output={log_dir}/%x-%j.out"):
        assert line in script, line
    assert "srun --kill-on-bad-exit=1" in script and "--trainer.num_nodes 4 --trainer.devices 8 --trainer.max_steps 5" in script
    assert log_dir == REPO / "runs" / "pretrain_7b" / "slurm" and "{{" not in script

    def make_n(**env: str) -> str:
        e = cli_env(**env)
        result = subprocess.run(["make", "-n", "-o", "setup", "pretrain", "SLURM=1", "NODES=4", "GPUS_PER_NODE=8",
                                 "EXP=experiments/pretrain_7b.yaml"], cwd=REPO, env=e, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "-m ibllm.slurm" in make_n() and "ibllm fit" not in make_n()
    inside = make_n(SLURM_JOB_ID="123")
    assert "-m ibllm.slurm" not in inside and "-m ibllm fit --config experiments/pretrain_7b.yaml" in inside
