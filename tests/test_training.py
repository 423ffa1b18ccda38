"""Lightning training on tiny configs: both stages, trainable-only checkpoints, resume, interruption."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

from datamodules import InstructionData, WebDatasetCaptions
from ibllm import tuning
from ibllm.lit import FinetuneModule, PretrainModule, unfilled_placeholders


def trainer(tmp_path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=str(tmp_path),
                     logger=L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb"), log_every_n_steps=1,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True,
                                                every_n_train_steps=1), *callbacks], **kwargs)


def captions(sp_model, caption_shards) -> WebDatasetCaptions:
    return WebDatasetCaptions(train=caption_shards, tokenizer=sp_model, batch_size=2, num_workers=0,
                              samples_per_epoch=8, max_words=160, image_size=224, shuffle_buffer=4)


def pretrain_module(sp_model, **kwargs) -> PretrainModule:
    return PretrainModule(llm="tiny", tokenizer=sp_model, imagebind="tiny", lr=5e-3, warmup_steps=1, **kwargs)


def test_warmup_cosine_schedule():
    assert tuning.warmup_cosine(0, 10, 100) == 0.0
    assert tuning.warmup_cosine(5, 10, 100) == 0.5
    assert tuning.warmup_cosine(10, 10, 100) == 1.0
    assert math.isclose(tuning.warmup_cosine(55, 10, 100), 0.5)
    assert math.isclose(tuning.warmup_cosine(100, 10, 100, min_ratio=0.1), 0.1)


def test_stage1_trains_and_checkpoints_only_trainables(tmp_path, sp_model, caption_shards):
    module = pretrain_module(sp_model)
    trainer(tmp_path, 4).fit(module, datamodule=captions(sp_model, caption_shards))
    gates = torch.stack([layer.attention.gate for layer in module.model.llama.layers])
    assert gates.abs().sum() > 0  # the zero gates moved
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    keys = {k.removeprefix("model.") for k in ckpt["state_dict"]}
    assert keys == {n for n, _ in tuning.trainable_parameters(module.model, "pretrain")}
    assert not any(k.startswith("image_bind.") or "tok_embeddings" in k for k in keys)
    assert ckpt["ibllm"]["stage"] == "pretrain" and ckpt["optimizer_states"]
    logs = list((tmp_path / "tb").rglob("events.out.tfevents*"))
    assert logs, "TensorBoard events were written"


def test_resume_continues_from_last(tmp_path, sp_model, caption_shards):
    trainer(tmp_path, 2).fit(pretrain_module(sp_model), datamodule=captions(sp_model, caption_shards))
    resumed = pretrain_module(sp_model)
    t = trainer(tmp_path, 4)
    t.fit(resumed, datamodule=captions(sp_model, caption_shards), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), weights_only=True)
    assert t.global_step == 4


class Interrupt(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            raise KeyboardInterrupt


def test_interrupted_run_saves_and_resumes(tmp_path, sp_model, caption_shards):
    saver = OnExceptionCheckpoint(dirpath=str(tmp_path / "interrupt"), filename="interrupted")
    t = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False,
                  callbacks=[Interrupt(), saver], default_root_dir=str(tmp_path))
    first = pretrain_module(sp_model)
    with pytest.raises(SystemExit):  # Lightning exits after its on_exception hooks ran (Ctrl-C semantics)
        t.fit(first, datamodule=captions(sp_model, caption_shards))
    saved = torch.load(tmp_path / "interrupt" / "interrupted.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    second = pretrain_module(sp_model)
    t2 = L.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    t2.fit(second, datamodule=captions(sp_model, caption_shards), ckpt_path=str(tmp_path / "interrupt" / "interrupted.ckpt"), weights_only=True)
    assert t2.global_step == 5


def test_stage2_starts_from_stage1(tmp_path, sp_model, caption_shards, instruction_files):
    stage1 = pretrain_module(sp_model)
    trainer(tmp_path / "s1", 2).fit(stage1, datamodule=captions(sp_model, caption_shards))
    stage2 = FinetuneModule(llm="tiny", tokenizer=sp_model, imagebind="tiny", lr=5e-3,
                            init_from=str(tmp_path / "s1" / "ckpt" / "last.ckpt"))
    data = InstructionData(train_files=[instruction_files["alpaca"], instruction_files["llava"]], tokenizer=sp_model,
                           max_words=160, batch_size=2, num_workers=0)
    trainer(tmp_path / "s2", 3).fit(stage2, datamodule=data)
    # stage-1 parameters came over and stayed frozen
    for name, value in stage1.model.state_dict().items():
        if tuning.is_trainable(name, "pretrain"):
            torch.testing.assert_close(stage2.model.state_dict()[name], value)
    ckpt = torch.load(tmp_path / "s2" / "ckpt" / "last.ckpt", weights_only=True)
    assert all(tuning.is_trainable(k.removeprefix("model."), "finetune") for k in ckpt["state_dict"])
    lora_b = [p for n, p in stage2.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)


def test_resuming_the_wrong_stage_is_refused(tmp_path, sp_model, caption_shards, instruction_files):
    trainer(tmp_path, 1).fit(pretrain_module(sp_model), datamodule=captions(sp_model, caption_shards))
    stage2 = FinetuneModule(llm="tiny", tokenizer=sp_model, imagebind="tiny")
    data = InstructionData(train_files=instruction_files["alpaca"], tokenizer=sp_model, max_words=160,
                           batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="stage 'pretrain'"):
        trainer(tmp_path / "x", 2).fit(stage2, datamodule=data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), weights_only=True)


class PoisonLoss(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            with torch.no_grad():
                pl_module.model.image_bind_proj.weight.fill_(float("nan"))


def test_non_finite_loss_stops_with_the_step(tmp_path, sp_model, caption_shards):
    with pytest.raises(FloatingPointError, match="global step 1"):
        trainer(tmp_path, 4, callbacks=[PoisonLoss()]).fit(pretrain_module(sp_model),
                                                           datamodule=captions(sp_model, caption_shards))


def test_placeholders_are_found():
    cfg = {"model": {"init_args": {"llm": "FILL_IN:/x", "lr": 1.0}}, "data": {"files": ["ok", "FILL_IN:y"]}}
    assert unfilled_placeholders(cfg) == ["model.init_args.llm", "data.files[1]"]
