"""Small real trainings of the digits demo for the learning tests and the cross-modal claim.

The demo's own pieces (data writers, stage-0 recipe with the ``demo`` preset, held-out accuracy callbacks)
run at test size: stage 0 with fewer steps, stages 1 and 2 on SmolLM2-135M-Instruct cut to its first
``SHALLOW_LAYERS`` blocks (real pretrained weights and tokenizer; the final norm and the tied output head
kept), for few steps at a high learning rate. A random tiny LLaMA is no stand-in here: with a frozen random
language model the stage-1 trainables cannot produce captions (it learns to stop at once).

Status: the sizes below are a first attempt and do not learn yet (stage 1 with 4 or 8 of SmolLM2's blocks,
150 steps at lr 4e-3, ends with empty captions, held-out accuracy 0.00); the tests that use this module are
not in the tree until a configuration that learns within the time budget is found.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from datamodules import InstructionData, WebDatasetCaptions
from ibllm import tuning
from ibllm.build import build_encoder, load_base_llama, load_llama_weights
from ibllm.checkpoints.adapters import load_trainable
from ibllm.demos.digits.callbacks import BeforeAfterAccuracy, DigitCaptionAccuracy, DigitInstructionAccuracy
from ibllm.demos.digits.data import DigitInstructions, DigitShards, write_digit_instructions, write_digit_shards
from ibllm.demos.digits.towers import DemoRecipe, build_demo_encoder
from ibllm.lit import FinetuneModule, PretrainModule
from ibllm.models.ibllm import ImageBindLLM

SMOLLM2 = "smollm2-135m-instruct"
SHALLOW_LAYERS = 4
# Stage 0 of the demo recipe (``demo`` preset, stage-1 crops, class-aware InfoNCE), shortened.
STAGE0 = DemoRecipe(steps=120, warmup=24)
STAGE1 = {"steps": 150, "batch_size": 8, "lr": 4e-3, "heldout": 100}
STAGE2 = {"steps": 60, "batch_size": 8, "lr": 4e-3, "heldout": 60}
INSTRUCTION_IMAGES = 300


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
    """One training run: held-out accuracy before and after, the checkpoint, the peak learning rates the
    optimizer was built with, and the run's wall and process (CPU) seconds."""

    before: float
    after: float
    checkpoint: Path | None
    peak_lrs: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0


def prepare_digits_demo(root: Path) -> DigitsDemo:
    """Digit shards, digit instructions and the shortened stage-0 encoder under ``root``."""
    shards = write_digit_shards(root / "shards")
    instructions = write_digit_instructions(root / "instructions", max_images=INSTRUCTION_IMAGES)
    encoder = build_demo_encoder(root / "encoder.safetensors", recipe=STAGE0, progress=False)
    return DigitsDemo(root, shards, instructions, encoder.path, encoder.info)


def shallow_smollm2(stage: str, encoder_weights: str | Path, modalities: tuple[str, ...] = ("vision",),
                    layers: int = SHALLOW_LAYERS, seed: int = 0) -> ImageBindLLM:
    """An ImageBindLLM on SmolLM2's first ``layers`` blocks with the frozen ``demo`` encoder ``encoder_weights``."""
    cfg, state = load_base_llama(SMOLLM2, visual_dim=128)
    cfg.n_layers = layers
    kept = {k: v for k, v in state.items() if not (m := re.match(r"layers\.(\d+)\.", k)) or int(m.group(1)) < layers}
    torch.manual_seed(seed)
    model = ImageBindLLM(cfg, stage=stage, encoder=build_encoder("demo", str(encoder_weights), modalities))
    load_llama_weights(model, kept, SMOLLM2)
    return model


class _Shallow:
    """``configure_model`` building :func:`shallow_smollm2` instead of the whole LLM (one process only)."""

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.model = shallow_smollm2(self.stage, hp.imagebind_weights)
        if hp.init_from:
            load_trainable(self.model, hp.init_from)
        tuning.cast_frozen(self.model, torch.bfloat16)


class ShallowPretrain(_Shallow, PretrainModule):
    """Stage 1 on the shallow SmolLM2."""


class ShallowFinetune(_Shallow, FinetuneModule):
    """Stage 2 on the shallow SmolLM2."""


def fit(module: L.LightningModule, data: L.LightningDataModule, metric: BeforeAfterAccuracy, steps: int,
        out: Path | None) -> StageRun:
    """Train ``steps`` steps on CPU in bf16 with ``metric`` scoring before and after; checkpoint to ``out``."""
    torch.manual_seed(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[metric], default_root_dir=out)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, data)
    checkpoint = None
    if out is not None:
        checkpoint = out / "last.ckpt"
        trainer.save_checkpoint(checkpoint)
    lrs = [g["initial_lr"] for opt in trainer.optimizers for g in opt.param_groups]
    return StageRun(metric.before, metric.after, checkpoint, lrs, time.perf_counter() - wall,
                    time.process_time() - cpu)


def train_stage1(demo: DigitsDemo, out: Path | None) -> StageRun:
    """Stage 1 of the demo at test size: captions of the training digits, scored on held-out digits."""
    module = ShallowPretrain(llm=SMOLLM2, imagebind="demo", imagebind_weights=str(demo.encoder),
                             modalities=["vision"], lr=STAGE1["lr"], warmup_steps=5, weight_decay=0.0,
                             frozen_dtype="bfloat16")
    data = WebDatasetCaptions(train=demo.shards.train_pattern, tokenizer=SMOLLM2, batch_size=STAGE1["batch_size"],
                              num_workers=0, samples_per_epoch=STAGE1["batch_size"] * STAGE1["steps"], max_words=48)
    metric = DigitCaptionAccuracy(demo.shards.heldout_pattern, limit=STAGE1["heldout"], max_gen_len=12)
    return fit(module, data, metric, STAGE1["steps"], out)


def train_stage2(demo: DigitsDemo, stage1: Path, out: Path | None) -> StageRun:
    """Stage 2 of the demo at test size from the stage-1 checkpoint: digit questions and number questions."""
    ins = demo.instructions
    module = ShallowFinetune(llm=SMOLLM2, imagebind="demo", imagebind_weights=str(demo.encoder),
                             modalities=["vision"], init_from=str(stage1), lr=STAGE2["lr"], warmup_steps=5,
                             weight_decay=0.0, frozen_dtype="bfloat16")
    data = InstructionData(train_files=[ins.llava_train, ins.alpaca_train], tokenizer=SMOLLM2, max_words=120,
                           batch_size=STAGE2["batch_size"], num_workers=0)
    metric = DigitInstructionAccuracy(ins.llava_heldout, limit=STAGE2["heldout"])
    return fit(module, data, metric, STAGE2["steps"], out)


@contextmanager
def scaled_adamw(scale: float) -> Iterator[None]:
    """Every ``torch.optim.AdamW`` built inside scales its learning rates (and its groups') by ``scale``."""
    original = torch.optim.AdamW

    class ScaledAdamW(original):  # type: ignore[misc, valid-type]
        def __init__(self, params: Any, lr: float = 1e-3, **kwargs: Any) -> None:
            params = [dict(g, lr=g["lr"] * scale) if isinstance(g, dict) and "lr" in g else g for g in params]
            super().__init__(params, lr=lr * scale, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim, "AdamW", ScaledAdamW)
        yield


def crippled(train: Callable[[], StageRun], scale: float = 1e-3) -> StageRun:
    """``train()`` with every AdamW learning rate scaled by ``scale``."""
    with scaled_adamw(scale):
        return train()
