"""Small real trainings of the digits demo, for the learning tests and the cross-modal claim.

The demo's own pieces run at test size: its data writers, its stage-0 recipe (fewer steps), the real
SmolLM2-135M-Instruct (frozen; bf16 where the CPU has bf16 matrix instructions, else fp32) and its held-out
accuracy callbacks. What makes them fit a test is fewer steps at a higher learning rate and smaller held-out
sets, nothing else: stage 1 reaches about 0.9 held-out caption accuracy in 70 steps on the whole LLM (a
frozen *random* or truncated LLM cannot caption: it learns to stop at once).

``pytest --adamw-lr-scale 1e-3`` scales every AdamW learning rate of stages 1 and 2 (not of the stage-0
fixture) to show that the learning tests catch crippled learning: they must then fail.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from datamodules import InstructionData, WebDatasetCaptions
from ibllm.cache_build.distributor import build_cache_from_shards
from ibllm.cache_build.mapper import make_factory
from ibllm.demos.crossmodal.audio_tower import AudioEncoder, AudioRecipe, build_audio_encoder
from ibllm.demos.crossmodal.speech import SpeechSpec
from ibllm.demos.digits.callbacks import BeforeAfterAccuracy, DigitCaptionAccuracy, DigitInstructionAccuracy
from ibllm.demos.digits.data import DigitInstructions, DigitShards, write_digit_instructions, write_digit_shards
from ibllm.demos.digits.towers import DemoRecipe, build_demo_encoder
from ibllm.lit import FinetuneModule, PretrainModule


def cpu_has_bf16_matmul() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX): then bf16 is about twice
    as fast as fp32 here; without it (AVX2, or AVX-512 without BF16) bf16 is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# The precision of the learning runs (stage 0 included): the demo's bf16 where the CPU has it, else fp32,
# which is faster than emulated bf16.
FROZEN_DTYPE, PRECISION = ("bfloat16", "bf16-mixed") if cpu_has_bf16_matmul() else ("float32", "32-true")

SMOLLM2 = "smollm2-135m-instruct"

# Stage 0 of the demo recipe, shortened (held-out zero-shot accuracy about 0.95 instead of 0.97).
STAGE0 = DemoRecipe(steps=300, warmup=20, bf16=FROZEN_DTYPE == "bfloat16")
STAGE1 = {"steps": 70, "batch_size": 8, "lr": 2e-3, "warmup": 5, "heldout": 60, "max_gen_len": 10}
STAGE2 = {"steps": 40, "batch_size": 4, "lr": 3e-3, "warmup": 5, "heldout_items": 24, "max_gen_len": 16}
INSTRUCTION_IMAGES = 300
# The audio tower at test size: 4 of the demo's 12 training voices, the extreme speeds and pitches; held out:
# 2 unseen voices at the in-between speeds (40 clips).
_FULL_SPEECH = SpeechSpec()
TEST_SPEECH = SpeechSpec(train_voices=_FULL_SPEECH.train_voices[:4], train_speeds=(120, 200), train_pitches=(25, 75),
                         heldout_voices=_FULL_SPEECH.heldout_voices[:2], heldout_speeds=(140, 180),
                         heldout_pitches=(50,))
AUDIO = AudioRecipe(steps=150, batch_size=64, warmup=10, speech=TEST_SPEECH, bf16=FROZEN_DTYPE == "bfloat16")


@dataclass
class DigitsDemo:
    """The demo assets at test size: shards, instructions and the stage-0 encoder (vision + text)."""

    root: Path
    shards: DigitShards
    instructions: DigitInstructions
    encoder: Path
    encoder_info: dict[str, Any]


@dataclass
class StageRun:
    """One training run: held-out accuracy before and after, the checkpoint and the run's wall seconds."""

    before: float
    after: float
    checkpoint: Path
    wall_s: float = 0.0


def prepare_digits_demo(root: Path) -> DigitsDemo:
    """Digit shards, digit instructions and the shortened stage-0 encoder under ``root``."""
    shards = write_digit_shards(root / "shards")
    instructions = write_digit_instructions(root / "instructions", max_images=INSTRUCTION_IMAGES)
    encoder = build_demo_encoder(root / "encoder.safetensors", recipe=STAGE0, progress=False)
    return DigitsDemo(root, shards, instructions, encoder.path, encoder.info)


@contextmanager
def scaled_adamw(scale: float) -> Iterator[None]:
    """Every ``torch.optim.AdamW`` built inside has its learning rates (and its groups') scaled by ``scale``."""
    if scale == 1.0:
        yield
        return
    original = torch.optim.AdamW

    class ScaledAdamW(original):  # type: ignore[misc, valid-type]
        def __init__(self, params: Any, lr: float = 1e-3, **kwargs: Any) -> None:
            params = [dict(g, lr=g["lr"] * scale) if isinstance(g, dict) and "lr" in g else g for g in params]
            super().__init__(params, lr=lr * scale, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim, "AdamW", ScaledAdamW)
        yield


def fit(module: L.LightningModule, data: L.LightningDataModule, metric: BeforeAfterAccuracy, steps: int,
        out: Path, lr_scale: float = 1.0) -> StageRun:
    """Train ``steps`` steps on CPU (:data:`PRECISION`) with ``metric`` scoring before and after; checkpoint to
    ``out``."""
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision=PRECISION, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[metric], default_root_dir=out)
    start = time.perf_counter()
    with scaled_adamw(lr_scale):
        trainer.fit(module, data)
    checkpoint = out / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert metric.before is not None and metric.after is not None
    return StageRun(metric.before, metric.after, checkpoint, time.perf_counter() - start)


def train_stage1(demo: DigitsDemo, out: Path, lr_scale: float = 1.0) -> StageRun:
    """Stage 1 of the demo at test size: captions of the training digits, scored on held-out digits."""
    s = STAGE1
    module = PretrainModule(llm=SMOLLM2, imagebind="demo", imagebind_weights=str(demo.encoder), modalities=["vision"],
                            lr=s["lr"], warmup_steps=s["warmup"], weight_decay=0.0, frozen_dtype=FROZEN_DTYPE)
    data = WebDatasetCaptions(train=demo.shards.train_pattern, tokenizer=SMOLLM2, batch_size=s["batch_size"],
                              num_workers=0, samples_per_epoch=s["batch_size"] * s["steps"], max_words=48)
    metric = DigitCaptionAccuracy(demo.shards.heldout_pattern, limit=s["heldout"], max_gen_len=s["max_gen_len"])
    return fit(module, data, metric, s["steps"], out, lr_scale)


def train_stage2(demo: DigitsDemo, stage1: Path, out: Path, lr_scale: float = 1.0) -> StageRun:
    """Stage 2 of the demo at test size from the stage-1 checkpoint, on the image conversations alone (the
    held-out metric asks about images; the demo's text-only number questions would halve the signal)."""
    s, ins = STAGE2, demo.instructions
    module = FinetuneModule(llm=SMOLLM2, imagebind="demo", imagebind_weights=str(demo.encoder), modalities=["vision"],
                            init_from=str(stage1), lr=s["lr"], warmup_steps=s["warmup"], weight_decay=0.0,
                            frozen_dtype=FROZEN_DTYPE)
    data = InstructionData(train_files=[ins.llava_train], tokenizer=SMOLLM2, max_words=120,
                           batch_size=s["batch_size"], num_workers=0)
    metric = DigitInstructionAccuracy(ins.llava_heldout, limit=s["heldout_items"], max_gen_len=s["max_gen_len"])
    return fit(module, data, metric, s["steps"], out, lr_scale)


def build_audio_and_cache(demo: DigitsDemo) -> tuple[AudioEncoder, Path]:
    """The audio tower bound to the demo's frozen vision tower (test-size recipe, espeak-ng speech) and the
    visual cache of the training images (``make cache``'s build), both under the demo's folder."""
    audio = build_audio_encoder(demo.root, recipe=AUDIO, progress=False)
    cache = demo.root / "cache"
    factory = make_factory("demo", str(demo.encoder), batch_size=64, device="cpu", precision="fp32", workers=0)
    build_cache_from_shards(demo.shards.train_pattern, cache, factory, show_progress=False)
    return audio, cache
