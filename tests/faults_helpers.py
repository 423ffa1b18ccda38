"""Helpers for the fault tests: a tiny ``fit`` experiment written as YAML, and callbacks that the training
subprocess imports (this folder is put on its PYTHONPATH)."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import torch
import yaml


def tiny_experiment(root: Path, sp_model: str, shards: str, *, max_steps: int = 4, every: int = 2,
                    callbacks: list[dict] | None = None, lr: float = 5e-3) -> Path:
    """``root/fit.yaml``: stage 1 of the tiny model on the generated caption shards, checkpointing every
    ``every`` steps into ``root/ckpt`` with the safe interruption checkpoint, as the experiments do."""
    ckpt = str(root / "ckpt")
    config = {
        "seed_everything": 0,
        "weights_only": True,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
            "default_root_dir": str(root),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": ckpt, "save_last": True, "every_n_train_steps": every}},
                {"class_path": "callbacks.faults.SafeExceptionCheckpoint",
                 "init_args": {"dirpath": ckpt, "filename": "interrupted"}},
                *(callbacks or []),
            ],
        },
        "model": {"class_path": "ibllm.lit.PretrainModule",
                  "init_args": {"llm": "tiny", "tokenizer": sp_model, "imagebind": "tiny", "lr": lr,
                                "warmup_steps": 1}},
        "data": {"class_path": "datamodules.WebDatasetCaptions",
                 "init_args": {"train": shards, "tokenizer": sp_model, "batch_size": 2, "num_workers": 0,
                               "samples_per_epoch": 8, "max_words": 160, "image_size": 224, "shuffle_buffer": 4}},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def restored_from(output: str) -> list[str]:
    """The checkpoint paths Lightning says it restored from, in order."""
    return re.findall(r"Restoring states from the checkpoint path at (\S+)", output)


class PoisonWhenLrAbove(L.Callback):
    """Simulates a learning rate that is too high: from global step ``step`` on, while the optimizer's peak
    lr is above ``threshold``, one trainable's gradient becomes inf, so AdamW writes NaN into it."""

    def __init__(self, step: int = 3, threshold: float = 1e-3) -> None:
        self.step, self.threshold = step, threshold
        self._reported = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        """Report the optimizer at the first batch (after every on_train_start hook ran)."""
        if self._reported:
            return
        self._reported = True
        opt = trainer.optimizers[0]
        print(f"train start: step {trainer.global_step} lr {opt.param_groups[0]['lr']:.6g} "
              f"peak {opt.param_groups[0].get('initial_lr', 0):.6g} moments {len(opt.state)}", flush=True)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        peak = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        if trainer.global_step + 1 >= self.step and peak > self.threshold:
            param = next(p for p in pl_module.model.parameters() if p.requires_grad and p.grad is not None)
            param.grad.fill_(float("inf"))


class SlowSave(L.Callback):
    """Makes every checkpoint ``mb`` MiB bigger (random bytes), so that a save takes long enough to be
    killed in the middle of it."""

    def __init__(self, mb: int = 48) -> None:
        self.mb = mb

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["ballast"] = torch.randint(0, 255, (self.mb << 20,), dtype=torch.uint8)
