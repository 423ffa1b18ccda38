"""Training monitors: per-layer gate openness, gradient norm, and a few logged generations."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from ibllm.generation import generate_tokens
from ibllm.processing.templates import CAPTION_INSTRUCTION, format_prompt


def total_grad_norm(module: torch.nn.Module) -> float | None:
    """L2 norm of all gradients of ``module`` (None when none exists). Sharded (DTensor) gradients, as under
    FSDP2, contribute their local shards and are summed across ranks; every rank must call this."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    plain = sum(float(g.double().pow(2).sum()) for g in grads if not hasattr(g, "to_local"))
    shards = [g.to_local().double().pow(2).sum() for g in grads if hasattr(g, "to_local")]
    if shards:
        sharded = torch.stack(shards).sum()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sharded)
        plain += float(sharded)
    return plain ** 0.5


def log_scalar(trainer: L.Trainer, name: str, value: float) -> None:
    """Write one scalar to every logger at the current global step."""
    for logger in trainer.loggers:
        logger.log_metrics({name: value}, step=trainer.global_step)


class GateMonitor(L.Callback):
    """Logs mean |tanh(gate)| per layer (how far each layer has opened the visual injection) and the
    total gradient L2 norm of the trainable parameters, every ``every_n_steps`` optimizer steps."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        """Log the gradient norm and the gates' openness every ``every_n_steps`` steps."""
        if trainer.global_step % self.every_n_steps:
            return
        norm = total_grad_norm(pl_module.model)
        if norm is not None:
            log_scalar(trainer, "train/grad_norm", norm)
        gates = [layer.attention.gate.detach().float().tanh().abs().mean().item() for layer in pl_module.model.llama.layers]
        for i, value in enumerate(gates):
            log_scalar(trainer, f"gates/layer_{i:02d}", value)
        log_scalar(trainer, "gates/mean", sum(gates) / len(gates))


class SampleGenerations(L.Callback):
    """Every ``every_n_steps`` steps, greedily answers ``prompts`` for the first images of a training
    batch and writes them to TensorBoard as text (default prompt: the stage-1 caption instruction)."""

    def __init__(self, every_n_steps: int = 100, prompts: Sequence[str] | None = None, num_samples: int = 2,
                 max_gen_len: int = 24) -> None:
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts) if prompts else [format_prompt(CAPTION_INSTRUCTION)]
        self.num_samples = num_samples
        self.max_gen_len = max_gen_len

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        """Every ``every_n_steps`` steps (global rank 0), write greedy answers for the batch's first images."""
        if trainer.global_step % self.every_n_steps or not trainer.is_global_zero or "image" not in batch:
            return
        tok = pl_module.tokenizer()
        model = pl_module.model
        was_training = model.training
        model.eval()
        images = batch["image"][: self.num_samples]
        visual = model.visual_token(image=images)
        lines = []
        for prompt in self.prompts:
            ids = [tok.encode(prompt, bos=True, eos=False)] * len(images)
            for i, out in enumerate(generate_tokens(model, ids, visual, self.max_gen_len, temperature=0, eos_id=tok.eos_id)):
                # caption batches (stage 1) carry "caption", instruction batches "text"
                reference = (batch.get("caption") or batch.get("text") or [""] * len(images))[i]
                lines.append(f"**sample {i}** → {tok.decode(out)!r}  \n(reference: {reference!r})")
        model.train(was_training)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("samples", "\n\n".join(lines), trainer.global_step)


class SampleKeyLog(L.Callback):
    """Appends the sample keys of every training batch to ``dirpath/keys.rank<R>.txt`` (one line per batch:
    ``global_step<TAB>key key ...``) — an audit of which samples each rank trained on, and in what order.

    Needs batches with a ``key`` list (the caption data modules provide one). The files are appended to
    across resumes, so a requeued job's lines follow the ones before the interruption.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        """Append this batch's keys to this rank's file."""
        keys = batch.get("key") if isinstance(batch, dict) else None
        if not keys:
            return
        folder = Path(self.dirpath)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"keys.rank{trainer.global_rank}.txt", "a", encoding="utf-8") as handle:
            handle.write(f"{trainer.global_step}\t{' '.join(map(str, keys))}\n")
