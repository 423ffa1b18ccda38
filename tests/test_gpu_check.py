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
                          text=True, timeout=850, cwd=ROOT)
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


def load_script():
    """bench/gpu_check.py as a module (bench/ is not an installed package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_only_report_pieces():
    """What only a GPU run fills in: the dense bf16 peaks by device name and the peaks set beside the plan."""
    check = load_script()
    assert check.bf16_peak("NVIDIA H100 80GB HBM3") == check.bf16_peak("NVIDIA H200") == 989e12
    assert check.bf16_peak("NVIDIA H100 PCIe") == 756e12 and check.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert check.bf16_peak("Tesla T4") is None
    plan = {"ImageBind-H vision, replicated (bf16)": 1.0, "FSDP gathered: root": 2.0, "FSDP gathered: 2 blocks": 3.0,
            "TOTAL without checkpointing": 40.0, "TOTAL with checkpointing": 30.0}
    parts = {"plan": {"pretrain": {"plan_1gpu_gib": plan}},
             "train_plain": {"pretrain/checkpointing=False": {"peak_gib": 33.0}},
             "train_fsdp": {"pretrain/checkpointing=True": {"peak_gib": 27.5},
                            "finetune/checkpointing=True": {"error": "out of memory"}}}
    assert check.memory_vs_plan(parts) == [
        {"stage": "pretrain", "wrap": "plain", "checkpointing": False, "measured_peak_gib": 33.0, "plan_gib": 34.0},
        {"stage": "pretrain", "wrap": "fsdp", "checkpointing": True, "measured_peak_gib": 27.5, "plan_gib": 29.0}]
