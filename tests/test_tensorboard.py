"""TensorBoard read-back: a short stage-1 run's event file holds the loss, learning rate, gradient norm,
gate values, throughput and the sample generations (with their reference captions)."""

from __future__ import annotations

import re

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.monitors import GateMonitor, SampleGenerations
from datamodules import WebDatasetCaptions
from ibllm.lit import PretrainModule

STEPS = 3


def read_events(folder) -> EventAccumulator:
    """Every scalar and text event under ``folder`` (no sampling)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_events_hold_the_training_signals(tmp_path, sp_model, caption_shards):
    module = PretrainModule(llm="tiny", tokenizer=sp_model, imagebind="tiny", lr=5e-3, warmup_steps=1)
    data = WebDatasetCaptions(train=caption_shards, tokenizer=sp_model, batch_size=2, num_workers=0,
                              samples_per_epoch=8, max_words=160, image_size=224, shuffle_buffer=4)
    logger = L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=logger, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=str(tmp_path),
                        callbacks=[LearningRateMonitor(logging_interval="step"), GateMonitor(every_n_steps=1),
                                   SampleGenerations(every_n_steps=1, num_samples=2, max_gen_len=4)])
    trainer.fit(module, datamodule=data)
    logger.experiment.flush()

    events = read_events(tmp_path / "tb" / "version_0")
    scalars = set(events.Tags()["scalars"])

    def values(tag: str) -> list[float]:
        return [e.value for e in events.Scalars(tag)]

    loss = values("train/loss")
    assert len(loss) == STEPS and all(0 < v < 20 for v in loss)
    lr_tags = [t for t in scalars if t.startswith("lr-")]
    assert lr_tags and all(len(values(t)) == STEPS for t in lr_tags)
    assert max(values(lr_tags[0])) > 0
    grad = values("train/grad_norm")
    assert len(grad) == STEPS and all(v > 0 for v in grad)
    layers = sorted(t for t in scalars if re.fullmatch(r"gates/layer_\d\d", t))
    assert layers and len(layers) == module.model.cfg.n_layers and "gates/mean" in scalars
    assert values("gates/mean")[0] == 0.0 and values("gates/mean")[-1] > 0  # zero-initialised gates open
    assert len(values("perf/tokens_per_s")) == STEPS - 1 and min(values("perf/tokens_per_s")) > 0  # from step 2

    assert "samples/text_summary" in events.Tags()["tensors"]
    texts = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")]
    assert len(texts) == STEPS
    for text in texts:
        assert text.count("**sample ") == 2
        references = re.findall(r"\(reference: '([^']*)'\)", text)
        assert len(references) == 2 and all(re.fullmatch(r"a (red|green|blue) square", r) for r in references)
