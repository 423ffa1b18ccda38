"""The SLURM launch path on a real local cluster (``pytest -k slurm`` selects exactly these tests).

``make pretrain SLURM=1`` renders experiments/slurm.sbatch and submits it; the job trains a tiny stage-1
model (tiny LLaMA + tiny encoder + generated shards) with FSDP2 on 2 CPU processes (gloo). Where the SLURM
packages are not installed the tests skip with the reason, or fail when CI is set (.ci/run installs them).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import LocalCluster

REPO = Path(__file__).resolve().parents[1]

# The clusters come from conftest.py (slurm_cluster, slurm_two_node_cluster).
pytestmark = pytest.mark.system


CONFIG = """seed_everything: 0
trainer:
  accelerator: cpu
  num_nodes: 1
  devices: 2
  strategy:
    class_path: ibllm.distributed.FSDP2Strategy
    init_args: {{process_group_backend: gloo}}
  precision: 32-true
  max_steps: {max_steps}
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_last: true, every_n_train_steps: 1, save_top_k: 0}}
    - class_path: callbacks.preemption.RequeueAtStepEnd
    - class_path: callbacks.monitors.SampleKeyLog
      init_args: {{dirpath: {root}/keys}}
model:
  class_path: ibllm.lit.PretrainModule
  init_args: {{llm: tiny, tokenizer: {sp}, imagebind: tiny, lr: 1.0e-3, warmup_steps: 0}}
data:
  class_path: datamodules.WebDatasetCaptions
  init_args: {{train: '{shards}', tokenizer: {sp}, batch_size: 2, num_workers: 0, samples_per_epoch: 800,
              max_words: 32, image_size: 224, shuffle_buffer: 4, resampled: {resampled}}}
"""


def write_config(tmp_path: Path, sp_model: str, shards: str, max_steps: int,
                 resampled: bool = True) -> tuple[Path, Path]:
    root = tmp_path / "run"
    cfg = tmp_path / "slurm_tiny.yaml"
    cfg.write_text(CONFIG.format(max_steps=max_steps, root=root, sp=sp_model, shards=shards,
                                 resampled=str(resampled).lower()))
    return cfg, root


def keys_by_rank(root: Path) -> dict[int, list[str]]:
    """The sample keys each rank trained on (callbacks.monitors.SampleKeyLog), in order."""
    out = {}
    for path in sorted((root / "keys").glob("keys.rank*.txt")):
        rank = int(path.stem.removeprefix("keys.rank"))
        out[rank] = [k for line in path.read_text().splitlines() for k in line.split("\t")[1].split()]
    return out


def submit(cluster: LocalCluster, cfg: Path, nodes: int, gpus_per_node: int) -> tuple[str, str]:
    """``make pretrain SLURM=1 ...``; returns (job id, make's output)."""
    result = subprocess.run(["make", "-s", "-o", "setup", "pretrain", "SLURM=1", f"NODES={nodes}",
                             f"GPUS_PER_NODE={gpus_per_node}", f"EXP={cfg}"],
                            cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"submitted job (\d+)", result.stdout)
    assert match, result.stdout
    return match[1], result.stdout


def meta(ckpt: Path) -> dict:
    """The non-tensor part of a sharded checkpoint folder."""
    import torch

    return torch.load(ckpt / "meta.pt", weights_only=False, map_location="cpu")


def job_logs(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((root / "slurm").glob("*.out")) +
                     sorted((root / "slurm").glob("*.err")))


def test_slurm_make_pretrain_runs_to_completion(slurm_cluster, tmp_path, sp_model, caption_shards):
    cfg, root = write_config(tmp_path, sp_model, caption_shards, max_steps=4)
    job, out = submit(slurm_cluster, cfg, 1, 2)
    assert "#SBATCH --ntasks-per-node=2" in out and "#SBATCH --requeue" in out and "srun " in out  # printed
    state = slurm_cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=240)
    assert state == "COMPLETED", job_logs(root) + slurm_cluster.logs()
    kept = root / "slurm" / f"slurm_tiny-{job}.sbatch"
    assert kept.is_file() and "#SBATCH --signal=SIGUSR1@90" in kept.read_text()
    assert (root / "slurm" / f"slurm_tiny-{job}.out").is_file()
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # sharded: one file per rank
    assert meta(last)["global_step"] == 4
    # each srun task read its rank from SLURM: the two resampled streams are different draws
    keys = keys_by_rank(root)
    assert sorted(keys) == [0, 1] and all(len(k) == 8 for k in keys.values()) and keys[0] != keys[1]


def test_slurm_usr1_requeues_and_resumes(slurm_cluster, tmp_path, sp_model, caption_shards):
    max_steps = 40
    cfg, root = write_config(tmp_path, sp_model, caption_shards, max_steps=max_steps)
    job, _ = submit(slurm_cluster, cfg, 1, 2)
    first = root / "checkpoints" / "last.ckpt" / "meta.pt"
    deadline = time.time() + 180
    while not first.is_file():  # training has started
        assert time.time() < deadline, job_logs(root)
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), job_logs(root)
        time.sleep(0.5)
    slurm_cluster.run("scancel", "--signal=USR1", job)
    hpc = root / "hpc_ckpt_1.ckpt"
    deadline = time.time() + 120
    while not (hpc / "meta.pt").is_file():
        assert time.time() < deadline, job_logs(root)
        time.sleep(0.5)
    saved_step = meta(hpc)["global_step"]
    assert 0 < saved_step < max_steps
    # The requeued job is held (BeginTime ~120 s ahead): release it.
    deadline = time.time() + 120
    while int(slurm_cluster.job_field(job, "Restarts") or 0) < 1 or slurm_cluster.job_state(job) != "RUNNING":
        assert time.time() < deadline, job_logs(root) + slurm_cluster.logs()
        if slurm_cluster.job_state(job) == "PENDING":
            slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        time.sleep(1)
    state = slurm_cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=240)
    logs = job_logs(root)
    assert state == "COMPLETED", logs
    assert f"job {job} restart 1" in logs  # the same job ran again
    # ... and resumed where the requeue left off. hpc_ckpt_1, last.ckpt (saved at the same step end) and
    # interrupted.ckpt (saved when the requeue's SIGTERM arrived) all hold saved_step; the newest is taken.
    restored = re.search(r"Restoring states from the checkpoint path at (\S+)", logs)
    assert restored, logs
    # hpc_ckpt_1 stays only if it is what the run resumed from: otherwise another file held its step, and the
    # resumed run deleted it (Lightning would keep every requeue's checkpoint).
    assert hpc.exists() == (Path(restored[1]).resolve() == hpc.resolve()), logs
    steps = [int(line.split("\t")[0]) for line in (root / "keys" / "keys.rank0.txt").read_text().splitlines()]
    assert steps == list(range(1, max_steps + 1)), steps  # each step once: none lost, none trained twice
    final = meta(root / "checkpoints" / "last.ckpt")
    assert final["global_step"] == max_steps
    # the data stream continues with a new shard order: the resumed run's seed includes resume_count 1
    assert final["WebDatasetCaptions"]["resume_count"] >= 1


def test_slurm_two_nodes(slurm_two_node_cluster, tmp_path, sp_model, caption_shards):
    cfg, root = write_config(tmp_path, sp_model, caption_shards, max_steps=3, resampled=False)
    job, out = submit(slurm_two_node_cluster, cfg, 2, 1)
    assert "#SBATCH --nodes=2" in out
    state = slurm_two_node_cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=240)
    assert state == "COMPLETED", job_logs(root) + slurm_two_node_cluster.logs()
    assert slurm_two_node_cluster.job_field(job, "NodeList") == "n[1-2]"
    assert meta(root / "checkpoints" / "last.ckpt")["global_step"] == 3
    # shards split by the ranks SLURM gave the two tasks: each reads one whole shard ("<shard>_<index>" keys),
    # not the other's
    keys = keys_by_rank(root)
    assert sorted(keys) == [0, 1] and all(len(k) == 6 for k in keys.values())
    shards = [{k.split("_")[0] for k in keys[rank]} for rank in (0, 1)]
    assert all(len(s) == 1 for s in shards) and shards[0] != shards[1], keys
