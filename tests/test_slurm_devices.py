"""CUDA-only launch details a CPU run cannot exercise: each launcher task's GPU (``ibllm.slurm.task_device``)
and the SLURM template's CPU and GPU handling."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from ibllm.slurm import build_script, task_device

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def eight_gpus(monkeypatch):
    """Pretend eight GPUs are visible (torch.device needs no driver)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_bare_cuda_goes_to_the_tasks_local_gpu(eight_gpus):
    assert task_device("cuda") == torch.device("cuda", 0)  # no launcher
    eight_gpus.setenv("SLURM_LOCALID", "5")
    assert task_device("cuda") == torch.device("cuda", 5)
    eight_gpus.setenv("LOCAL_RANK", "3")  # torchrun's variable wins
    assert task_device("cuda") == torch.device("cuda", 3)
    assert task_device("cuda", local_rank=9) == torch.device("cuda", 1)  # modulo the visible GPUs
    assert task_device("cuda:6") == torch.device("cuda", 6)  # an explicit index is kept
    assert task_device("cpu") == torch.device("cpu")


def test_default_device_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert task_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert task_device() == torch.device("cuda", 1)


def test_sbatch_passes_cpus_per_task_to_srun_and_asks_gpus_only_for_gpu_runs(tmp_path):
    script, _ = build_script("experiments/pretrain_7b.yaml", 4, 8, cpus_per_task="10", workdir=REPO)
    assert "#SBATCH --cpus-per-task=10" in script and "#SBATCH --gres=gpu:8" in script
    assert 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"' in script
    assert "#SBATCH --gpus-per-task" not in script and "{{" not in script
    demo, _ = build_script("experiments/demo_pretrain.yaml", 1, 2, workdir=REPO)
    assert "#SBATCH --gres" not in demo and "#SBATCH --cpus-per-task" not in demo  # CPU experiment, default CPUs
    # the job's header line, run by bash: CPUs are handed to srun only when the allocation states them
    header = "\n".join(line for line in script.splitlines() if line.startswith(("if [", "echo")))
    for env, expect in (({"SLURM_CPUS_PER_TASK": "10"}, "SRUN=10"), ({}, "SRUN=unset")):
        result = subprocess.run(["bash", "-c", header + '\necho "SRUN=${SRUN_CPUS_PER_TASK:-unset}"'],
                                env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "0,1", **env},
                                capture_output=True, text=True, check=True)
        assert expect in result.stdout and "CUDA_VISIBLE_DEVICES=0,1" in result.stdout


def test_make_passes_cpus_per_task(cli_env):
    result = subprocess.run(["make", "-n", "-o", "setup", "pretrain", "SLURM=1", "CPUS_PER_TASK=12",
                             "EXP=experiments/pretrain_7b.yaml"], cwd=REPO, env=cli_env(), capture_output=True,
                            text=True, check=True)
    assert '--cpus-per-task "12"' in result.stdout
