"""The evaluation harness as a training callback: every N optimizer steps, answer a small held-out set
with the paper's prompts and score it with the task's scorer; metrics go to every logger (TensorBoard:
``eval/<task>/<metric>``) and a few answers to TensorBoard text.

Example (YAML)::

    trainer:
      callbacks:
        - class_path: callbacks.evaluation.EvaluationCallback
          init_args: {task: vqa, data: easy-vqa, every_n_steps: 500, limit: 64}
"""

from __future__ import annotations

import lightning as L

from ibllm.evaluation.prompts import EvalSettings
from ibllm.evaluation.readers import Sample, read_task
from ibllm.evaluation.runner import generate_answers, score_answers


class EvaluationCallback(L.Callback):
    """Scores ``task`` on the first ``limit`` samples of ``data`` every ``every_n_steps`` steps (global rank 0).

    Args:
        task / data: as ``python -m ibllm evaluate`` (``--task`` / ``--data``).
        every_n_steps: evaluation period in optimizer steps (also run at the end of fitting when ``at_end``).
        limit: held-out samples (MME: whole image pairs).
        temperature: 0 (greedy, default) gives stable curves; 0.1 is the paper's setting.
        max_new_tokens: generation budget (default: the task's, capped at 32 to keep training fast).
    """

    def __init__(self, task: str, data: str, every_n_steps: int = 500, limit: int = 64, batch_size: int = 16,
                 temperature: float = 0.0, top_p: float = 0.75, max_new_tokens: int | None = 32,
                 at_end: bool = True, num_text_examples: int = 4) -> None:
        self.task, self.data, self.every_n_steps, self.limit = task, data, every_n_steps, limit
        self.batch_size, self.at_end, self.num_text_examples = batch_size, at_end, num_text_examples
        self.settings = EvalSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self._samples: list[Sample] | None = None
        self._last_step = -1
        self.history: list[tuple[int, dict[str, float]]] = []

    def samples(self) -> list[Sample]:
        """The held-out samples (read once)."""
        if self._samples is None:
            self._samples = read_task(self.task, self.data, self.limit)
        return self._samples

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Answer, score and log the held-out set at the current step; returns the metrics."""
        samples = self.samples()
        answers = generate_answers(pl_module.model, pl_module.tokenizer(), samples, self.settings,
                                   self.batch_size, progress=False)
        metrics = score_answers(self.task, samples, answers)
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{self.task}/{k}": v for k, v in metrics.items()}, step=step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                lines = [f"**{s.question or s.task}** → {answers[s.id]!r} (reference: {s.answers[:3]})"
                         for s in samples[: self.num_text_examples]]
                experiment.add_text(f"eval/{self.task}/examples", "  \n".join(lines), step)
        self.history.append((step, metrics))
        self._last_step = step
        return metrics

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        """Evaluate every ``every_n_steps`` optimizer steps (global rank 0)."""
        step = trainer.global_step
        if step and step % self.every_n_steps == 0 and step != self._last_step and trainer.is_global_zero:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A last evaluation at the end of fitting (``at_end``), unless this step was just evaluated."""
        if self.at_end and trainer.global_step != self._last_step and trainer.is_global_zero:
            self.evaluate(trainer, pl_module)
