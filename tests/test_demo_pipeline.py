"""The embedded demo, shortened: demo preparation, then stage 1 and stage 2 through the real CLI and the
real experiment files (tiny random LM and few steps instead of SmolLM2 and hundreds of steps)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.system  # the real command line, as subprocesses


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, run_ibllm) -> Path:
    work = tmp_path_factory.mktemp("demo")
    run_ibllm(["demo", "prepare", "--stage0-steps", "3"], work, check=True)
    return work


def tiny_overrides(sp_model: str) -> list[str]:
    return ["--model.init_args.llm", "tiny", "--model.init_args.tokenizer", sp_model,
            "--data.init_args.tokenizer", sp_model, "--data.init_args.max_words", "200",
            "--data.init_args.num_workers", "0", "--trainer.max_steps", "3"]


def test_demo_prepare_is_idempotent(demo_dir, run_ibllm):
    for path in ("data/demo/shards/train", "data/demo/shards/heldout", "data/demo/instructions/llava_train.json",
                 "data/demo/encoder.safetensors"):
        assert (demo_dir / path).exists(), path
    stamp = (demo_dir / "data/demo/encoder.safetensors").stat().st_mtime
    run_ibllm(["demo", "prepare", "--stage0-steps", "3"], demo_dir, check=True)
    assert (demo_dir / "data/demo/encoder.safetensors").stat().st_mtime == stamp


def test_demo_stage1_then_stage2_end_to_end(demo_dir, sp_model, run_ibllm):
    out = run_ibllm(["fit", "--config", ROOT / "experiments/demo_pretrain.yaml", *tiny_overrides(sp_model)], demo_dir,
                    check=True).stdout
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"heldout_caption_accuracy: \d\.\d\d \(untrained: \d\.\d\d\)", last), last
    assert (demo_dir / "runs/demo_pretrain/checkpoints/last.ckpt").is_file()
    assert list((demo_dir / "runs/demo_pretrain/tensorboard").rglob("events.out.tfevents*"))
    assert json.loads((demo_dir / "data/demo/cache/cache.json").read_text())["count"] > 0  # built by the fit

    out = run_ibllm(["fit", "--config", ROOT / "experiments/demo_finetune.yaml", *tiny_overrides(sp_model)], demo_dir,
                    check=True).stdout
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"heldout_instruction_accuracy: \d\.\d\d \(before finetune: \d\.\d\d\)", last), last
    assert (demo_dir / "runs/demo_finetune/checkpoints/last.ckpt").is_file()


def test_placeholders_in_the_7b_experiment_are_reported(tmp_path, run_ibllm):
    proc = run_ibllm(["fit", "--config", ROOT / "experiments/pretrain_7b.yaml"], tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "--model.init_args.llm" in proc.stderr + proc.stdout
