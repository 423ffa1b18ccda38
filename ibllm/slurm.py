"""Render, keep and submit the SLURM batch script of a training run: ``python -m ibllm.slurm --config X.yaml``.

``make pretrain SLURM=1 NODES=4 GPUS_PER_NODE=8 [PARTITION=.. TIME=.. ACCOUNT=..]`` calls this outside an
allocation. The template (``experiments/slurm.sbatch``) gets ``{{name}}`` placeholders filled in; the script
is printed, written to ``<default_root_dir>/slurm/<job>-<timestamp>.sbatch`` (next to the job's
``%x-%j.out/.err`` logs) and submitted with ``sbatch``; after submission the kept copy is renamed to
``<job>-<jobid>.sbatch`` so it sits beside that job's logs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ibllm.verbs.registry import run, verb

TEMPLATE = Path(__file__).resolve().parents[1] / "experiments" / "slurm.sbatch"
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def task_device(device: str | None = None, local_rank: int | None = None) -> Any:
    """The ``torch.device`` a launcher task (srun / torchrun process) computes on.

    ``device`` None picks CUDA when available, else the CPU. A bare ``cuda`` becomes ``cuda:L`` with ``L``
    this task's local rank (``local_rank``, else the launcher's ``LOCAL_RANK`` / ``SLURM_LOCALID`` / ...)
    modulo the visible GPUs: ``srun --ntasks-per-node=8`` under ``--gres=gpu:8`` shows every task all eight
    GPUs, and plain ``cuda`` would put all eight tasks on the first one. An explicit index is kept.
    """
    # torch (also imported by processing.shards) only here: the submit command does not need it
    import torch

    from ibllm.processing.shards import world_info

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type != "cuda" or resolved.index is not None:
        return resolved
    if local_rank is None:
        local_rank = world_info(0, 1, 0, 1).local_rank
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def render(template: str, values: dict[str, Any]) -> str:
    """Fill ``{{name}}`` placeholders; a placeholder without a value is an error naming it."""
    missing = sorted({m for m in PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise KeyError(f"SLURM template placeholders without a value: {', '.join(missing)}")
    text = PLACEHOLDER.sub(lambda m: str(values[m[1]]), template)
    return re.sub(r"\n{3,}", "\n\n", text)


def experiment_settings(config: str | Path, args: Sequence[str] = ()) -> dict[str, Any]:
    """``default_root_dir`` and ``accelerator`` of an experiment YAML, with ``--trainer.X V`` overrides from ``args``."""
    import yaml

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    trainer = dict(data.get("trainer") or {})
    tokens = list(args)
    for i, token in enumerate(tokens):
        for key in ("default_root_dir", "accelerator"):
            flag = f"--trainer.{key}"
            if token == flag and i + 1 < len(tokens):
                trainer[key] = tokens[i + 1]
            elif token.startswith(flag + "="):
                trainer[key] = token.split("=", 1)[1]
    return {"default_root_dir": str(trainer.get("default_root_dir") or "runs/" + path.stem),
            "accelerator": str(trainer.get("accelerator") or "auto")}


def build_script(config: str, nodes: int, tasks_per_node: int, args: Sequence[str] = (), partition: str = "",
                 time_limit: str = "", account: str = "", gres: str | None = None, cpus_per_task: str = "",
                 job_name: str | None = None, prepare_demo: bool = False, python: str | None = None,
                 template: str | Path = TEMPLATE, workdir: str | Path | None = None) -> tuple[str, Path]:
    """The rendered batch script and its log folder (``<default_root_dir>/slurm``, absolute)."""
    if nodes < 1 or tasks_per_node < 1:
        raise ValueError(f"NODES ({nodes}) and GPUS_PER_NODE ({tasks_per_node}) must be >= 1")
    workdir = Path(workdir or os.getcwd()).resolve()
    settings = experiment_settings(config, args)
    log_dir = (workdir / settings["default_root_dir"] / "slurm").resolve()
    if gres is None:  # GPUs unless the experiment trains on CPU
        gres = "" if settings["accelerator"] == "cpu" else f"gpu:{tasks_per_node}"
    directives = [f"#SBATCH --{name}={value}" for name, value in
                  (("partition", partition), ("time", time_limit), ("account", account), ("gres", gres),
                   ("cpus-per-task", cpus_per_task)) if value]
    python = python or sys.executable
    values = {
        "job_name": job_name or Path(config).stem,
        "nodes": nodes,
        "tasks_per_node": tasks_per_node,
        "log_dir": str(log_dir),
        "optional_directives": "\n".join(directives),
        "workdir": shlex.quote(str(workdir)),
        "python": shlex.quote(python),
        "config": shlex.quote(str(config)),
        "args": shlex.join(list(args)),
        "prepare": f"{shlex.quote(python)} -m ibllm demo prepare" if prepare_demo else "",
    }
    template_path = Path(template)
    if not template_path.is_file():
        raise FileNotFoundError(f"SLURM template not found: {template_path}")
    return render(template_path.read_text(), values), log_dir


def submit(script: str, log_dir: Path, job_name: str, sbatch: str = "sbatch") -> tuple[str, Path]:
    """Keep ``script`` in ``log_dir`` and submit it; returns ``(job_id, kept_script_path)``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    kept = log_dir / f"{job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    kept.write_text(script)
    try:
        result = subprocess.run([*shlex.split(sbatch), "--parsable", str(kept)], capture_output=True, text=True,
                                check=False)
    except FileNotFoundError as e:
        raise RuntimeError(f"cannot run {sbatch!r}: is SLURM installed here? (script kept at {kept})") from e
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()} (script kept at {kept})")
    job_id = result.stdout.strip().split(";")[0]
    final = log_dir / f"{job_name}-{job_id}.sbatch"
    kept.replace(final)
    return job_id, final


@verb("slurm", program="python -m ibllm.slurm", description=__doc__, config_file=False)
def submit_command(config: str, nodes: int = 1, gpus_per_node: int = 8, args: str = "", partition: str = "",
                   time: str = "", account: str = "", gres: str | None = None, cpus_per_task: str = "",
                   job_name: str | None = None, prepare_demo: bool = False, python: str | None = None,
                   template: str = str(TEMPLATE), sbatch: str = "sbatch", dry_run: bool = False) -> None:
    """Render the job script, print it, keep it and submit it (used by the Makefile).

    Args:
        config: experiment YAML
        nodes: nodes
        gpus_per_node: tasks (processes) per node, one per GPU
        args: extra `python -m ibllm fit` flags, as one string
        partition: SLURM partition
        time: time limit, e.g. 3-00:00:00
        account: SLURM account
        gres: default gpu:GPUS_PER_NODE, none for CPU experiments
        cpus_per_task: CPUs per task
        job_name: default: the experiment file's name
        prepare_demo: run `ibllm demo prepare` before training
        python: interpreter for the job (default: this one)
        template: the sbatch template
        sbatch: submit command
        dry_run: print the script only
    """
    name = job_name or Path(config).stem
    try:
        script, log_dir = build_script(config, nodes, gpus_per_node, shlex.split(args), partition, time, account,
                                       gres, cpus_per_task, job_name, prepare_demo, python, template)
        print(script)
        if dry_run:
            return
        job_id, kept = submit(script, log_dir, name, sbatch)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1)
    print(f"submitted job {job_id}; script kept at {kept}; logs: {log_dir}/{name}-{job_id}.out")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line (used by the Makefile): ``python -m ibllm.slurm --config EXP.yaml [options]``."""
    run("slurm", argv)


if __name__ == "__main__":
    main()
