"""Exact resume in one process: stop after k optimizer steps, resume from the last checkpoint to n, and
get the same trainables, optimizer state and per-step losses as a run straight to n."""

from __future__ import annotations

import copy
import shutil

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.preemption import RequeueAtStepEnd
from datamodules import WebDatasetCaptions
from ibllm import tuning
from ibllm.lit import PretrainModule

TOTAL = 6  # optimizer steps of the whole run
PER_EPOCH = 3  # samples_per_epoch 6 / batch 2


class SameOrderCaptions(WebDatasetCaptions):
    """The caption data module, except that resuming keeps the sample order of an uninterrupted run.

    The real module bumps ``resume_count`` on resume so that a requeued job draws a fresh order (Lightning
    restarts a partly done epoch from its start); with the count kept, epoch ``e`` is the same stream in
    both runs, so a resume at an epoch boundary must reproduce the uninterrupted run exactly.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        self.resume_count = int(state_dict.get("resume_count", 0))


class LossRecorder(L.Callback):
    """Records (global step after the update, loss) of every training batch."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((trainer.global_step, float(outputs["loss"])))


class StopAt(L.Callback):
    """Asks the trainer to stop after ``step`` optimizer steps (as a time limit or preemption would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class Snapshot(L.Callback):
    """Copies of the trainables, optimizer and scheduler state when training starts and when it ends."""

    def __init__(self) -> None:
        self.start: dict | None = None
        self.end: dict | None = None

    @staticmethod
    def take(trainer, pl_module) -> dict:
        return {"params": {n: p.detach().clone() for n, p in tuning.trainable_parameters(pl_module.model, "pretrain")},
                "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
                "scheduler": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
                "step": trainer.global_step}

    def on_train_start(self, trainer, pl_module):
        self.start = self.take(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.end = self.take(trainer, pl_module)


def fit(tmp_path, sp_model, caption_shards, callbacks, ckpt_path=None) -> Snapshot:
    """A tiny stage-1 run scheduled for ``TOTAL`` steps (warmup then cosine), checkpointing every step."""
    module = PretrainModule(llm="tiny", tokenizer=sp_model, imagebind="tiny", lr=5e-3, warmup_steps=2)
    data = SameOrderCaptions(train=caption_shards, tokenizer=sp_model, batch_size=2, num_workers=0,
                             samples_per_epoch=2 * PER_EPOCH, max_words=160, image_size=224, shuffle_buffer=4)
    snapshot = Snapshot()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=TOTAL, default_root_dir=str(tmp_path), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True,
                                                   every_n_train_steps=1), snapshot, *callbacks])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    return snapshot


def assert_same_state(a: dict, b: dict) -> None:
    """Bit-identical trainables, AdamW state (moments, step counts, param groups) and scheduler state."""
    assert a["step"] == b["step"]
    assert a["params"].keys() == b["params"].keys() and a["params"]
    for name, p in a["params"].items():
        assert torch.equal(p, b["params"][name]), f"trainable {name} differs"
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]  # lr, betas, weight decay, parameter indices
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for i, state in opt_a["state"].items():
        assert state.keys() == opt_b["state"][i].keys()
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][i][name]), f"optimizer state {i}.{name} differs"
    assert a["scheduler"] == b["scheduler"]


def test_resume_at_epoch_end_equals_uninterrupted_run(tmp_path, sp_model, caption_shards):
    straight = LossRecorder()
    full = fit(tmp_path / "straight", sp_model, caption_shards, [straight])
    first, second = LossRecorder(), LossRecorder()
    part = fit(tmp_path / "resumed", sp_model, caption_shards, [first, StopAt(PER_EPOCH)])
    resumed = fit(tmp_path / "resumed", sp_model, caption_shards, [second],
                  ckpt_path=str(tmp_path / "resumed" / "ckpt" / "last.ckpt"))
    assert part.end["step"] == PER_EPOCH and resumed.end["step"] == full.end["step"] == TOTAL
    assert_same_state(part.end, resumed.start)
    assert [s for s, _ in first.losses + second.losses] == list(range(1, TOTAL + 1))
    assert first.losses + second.losses == straight.losses  # every step's loss, bit for bit
    assert_same_state(full.end, resumed.end)
    assert any(not torch.equal(p, full.start["params"][n]) for n, p in full.end["params"].items())  # it trained


def test_resume_mid_epoch_restores_the_exact_state(tmp_path, sp_model, caption_shards):
    # Lightning restarts a partly done epoch from its first batch (the loader keeps no position), so only the
    # restored state, not the later losses, can equal the uninterrupted run's.
    first, second = LossRecorder(), LossRecorder()
    part = fit(tmp_path, sp_model, caption_shards, [first, StopAt(PER_EPOCH - 1)])
    resumed = fit(tmp_path, sp_model, caption_shards, [second], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert part.end["step"] == PER_EPOCH - 1
    assert_same_state(part.end, resumed.start)
    assert [s for s, _ in first.losses + second.losses] == list(range(1, TOTAL + 1))


def test_a_resumed_run_deletes_the_requeue_checkpoints_it_no_longer_needs(tmp_path, sp_model, caption_shards):
    # Requeue checkpoints as SLURM requeues leave them: steps 2 and 3, one unreadable, and one from a later
    # point (6 steps) that the user chose not to resume from.
    last = tmp_path / "ckpt" / "last.ckpt"
    fit(tmp_path, sp_model, caption_shards, [StopAt(2)])
    shutil.copy(last, tmp_path / "hpc_ckpt_1.ckpt")
    fit(tmp_path, sp_model, caption_shards, [StopAt(3)], ckpt_path=str(last))
    shutil.copy(last, tmp_path / "hpc_ckpt_2.ckpt")
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"truncated")
    fit(tmp_path / "ahead", sp_model, caption_shards, [])
    shutil.copy(tmp_path / "ahead" / "ckpt" / "last.ckpt", tmp_path / "hpc_ckpt_4.ckpt")

    resumed = fit(tmp_path, sp_model, caption_shards, [RequeueAtStepEnd()], ckpt_path=str(tmp_path / "hpc_ckpt_2.ckpt"))
    assert resumed.start["step"] == 3 and resumed.end["step"] == TOTAL
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*")) == ["hpc_ckpt_2.ckpt", "hpc_ckpt_3.ckpt",
                                                                    "hpc_ckpt_4.ckpt"]
