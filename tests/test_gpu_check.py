"""The GPU check (``bench/gpu_check.py``) rehearsed end to end at tiny shapes on the CPU, so that the script a
short GPU slot runs cannot rot between slots; and a part that runs over its budget is stopped without
stopping the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
PARTS = ["parity", "train_plain", "train_fsdp", "decode", "encoder", "plan", "faiss"]


def run_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the check on the CPU; return the process and the report from its last line (equal to the file)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out), *args], capture_output=True,
                          text=True, timeout=800, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("gpu_check: "), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("gpu_check: "))
    assert report == json.loads(out.read_text())
    return proc, report


@pytest.mark.system
def test_cpu_rehearsal_runs_every_part(tmp_path):
    proc, report = run_check(tmp_path / "gpu_check.json")
    parts = report["parts"]
    assert list(parts) == PARTS
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(PARTS, "ok"), proc.stdout[-4000:]
    assert proc.returncode == 0 and report["failed"] == [] and report["mode"] == "cpu"
    assert report["env"]["device"] == "cpu" and report["env"]["torch"]
    assert parts["parity"]["parity"]["ok"] and parts["parity"]["parity"]["max_logit_diff"] < 0.1
    for wrap in ("plain", "fsdp"):
        for stage in ("pretrain", "finetune"):
            for checkpointing in (False, True):
                row = parts[f"train_{wrap}"][f"{stage}/checkpointing={checkpointing}"]
                assert row["finite"] and row["tokens_per_s"] > 0 and row["trainable"] > 0 and row["mfu"] is None
    # checkpointing recomputes, it does not change the loss (same seed, same data, same weights)
    plain, fsdp = parts["train_plain"], parts["train_fsdp"]
    for stage in ("pretrain", "finetune"):
        assert plain[f"{stage}/checkpointing=False"]["loss_first_last"][0] == pytest.approx(
            plain[f"{stage}/checkpointing=True"]["loss_first_last"][0], rel=1e-3)
        assert plain[f"{stage}/checkpointing=False"]["loss_first_last"][0] == pytest.approx(
            fsdp[f"{stage}/checkpointing=False"]["loss_first_last"][0], rel=1e-2)
    assert parts["decode"]["batch1"]["tokens_per_s"] > 0 and parts["decode"]["batch8"]["tokens_per_s"] > 0
    assert parts["encoder"]["shard_bf16"]["encoded"] == parts["encoder"]["shard_bf16"]["images"] > 0
    for stage in ("pretrain", "finetune"):
        plan = parts["plan"][stage]
        assert plan["plan_1gpu_gib"]["TOTAL without checkpointing"] > plan["plan_32gpu_total_gib"]["TOTAL without checkpointing"] > 0
    index = parts["faiss"]["index"]
    assert index["factory"].startswith("IVF") and index["recall_at_10"] > 0.8 and index["qps"] > 0


@pytest.mark.system
def test_a_part_over_its_budget_is_stopped_and_the_next_still_runs(tmp_path):
    proc, report = run_check(tmp_path / "report.json", "--parts", "plan,faiss", "--budget", "plan=0.5")
    plan, faiss = report["parts"]["plan"], report["parts"]["faiss"]
    assert plan["status"] == "timeout" and plan["seconds"] < 30
    assert faiss["status"] == "ok" and faiss["index"]["recall_at_10"] > 0.8
    assert report["failed"] == ["plan"] and proc.returncode == 1
    assert report["memory_vs_plan"] == []
