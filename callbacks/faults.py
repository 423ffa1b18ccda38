"""The interruption checkpoint, made safe: it never replaces progress with less, nor with diverged weights.

Lightning's ``OnExceptionCheckpoint`` saves whatever the model holds when anything goes wrong, including a
failure before the checkpoint was restored (it then saves the untrained step-0 model, which the next run
resumes from as the newest file) and a divergence (it saves NaN weights). :class:`SafeExceptionCheckpoint`
saves only when the run has made optimizer steps past the step it started or resumed at and its weights are
finite, and always ends with a message saying what was saved and the exact command that resumes.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ibllm.checkpoints.lightning_io import clean_partial_saves
from ibllm.checkpoints.recovery import (RESET_OPTIMIZER_FLAG, check_finite_trainables, last_finite_checkpoint,
                                        rank_checkpoints, resume_candidates, resume_command)

log = logging.getLogger(__name__)


class SafeExceptionCheckpoint(OnExceptionCheckpoint):
    """Save ``dirpath/filename.ckpt`` on an exception only after real, finite progress; say how to resume.

    Also removes the leftovers of checkpoint writes killed in an earlier run (see
    :mod:`ibllm.checkpoints.lightning_io`) from every checkpoint folder when the run starts.

    Args:
        dirpath: folder of the interruption checkpoint (usually the ModelCheckpoint folder).
        filename: its name without ``.ckpt``.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        super().__init__(dirpath=dirpath, filename=filename)
        self._start_step: int | None = None
        self.message: str | None = None  # the last recovery message, also printed to stderr

    def _folders(self, trainer: L.Trainer) -> list[Path]:
        folders = [Path(self.dirpath)]
        folders += [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
                    if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        return list(dict.fromkeys(folders))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Clean up after checkpoint writes an earlier run was killed in (rank 0)."""
        self._start_step = None
        if trainer.is_global_zero:
            for folder in self._folders(trainer):
                for action in clean_partial_saves(folder):
                    print(action, file=sys.stderr, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember the step training starts from (after any checkpoint was restored)."""
        self._start_step = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Save only real, finite progress; then print what happened and how to resume."""
        diverged = isinstance(exception, FloatingPointError) or self._weights_diverged(trainer, pl_module)
        reason = self._reason_not_to_save(trainer, diverged)
        saved = None
        if reason is None:
            try:
                trainer.save_checkpoint(self.ckpt_path)
                saved = Path(self.ckpt_path)
            except Exception as e:  # never hide the exception that stopped training behind a failed save
                reason = f"saving {self.ckpt_path} failed ({type(e).__name__}: {e})"
        if trainer.is_global_zero:
            self.message = self._message(trainer, pl_module, exception, saved, reason, diverged)
            print(self.message, file=sys.stderr, flush=True)

    def _weights_diverged(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        model = getattr(pl_module, "model", None)
        if model is None or self._start_step is None:
            return False
        try:
            check_finite_trainables(model, getattr(pl_module, "stage", "finetune"), trainer.global_step, agree=False)
        except FloatingPointError:
            return True
        return False

    def _reason_not_to_save(self, trainer: L.Trainer, diverged: bool) -> str | None:
        if self._start_step is None:
            return "training had not started (nothing was restored or trained)"
        if trainer.global_step <= self._start_step:
            return f"no optimizer step since the run started at global step {self._start_step}"
        if diverged:
            return "the weights diverged"
        return None

    def _message(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException,
                 saved: Path | None, reason: str | None, diverged: bool) -> str:
        what = _describe(exception)
        if diverged:
            return self._divergence_message(trainer, pl_module, what)
        lines = [f"{what} at global step {trainer.global_step}."]
        if saved is not None:
            lines.append(f"Saved {saved} (global step {trainer.global_step}). Resume with:")
            lines.append("  " + resume_command(saved))
            return "\n".join(lines)
        lines.append(f"Nothing was saved: {reason}.")
        ranked, _ = rank_checkpoints(resume_candidates(trainer))
        if ranked:
            step, _, best = ranked[0]
            lines.append(f"The latest checkpoint is {best} (global step {step}). Resume with:")
            lines.append("  " + resume_command(best))
        return "\n".join(lines)

    def _divergence_message(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> str:
        lines = [f"{what}.", "Nothing diverged was saved."]
        found = last_finite_checkpoint(self._folders(trainer), [p for p in resume_candidates(trainer)])
        hp = getattr(pl_module, "hparams", {})
        use_blr = hp.get("blr") is not None
        current = hp.get("blr") if use_blr else hp.get("lr", 1e-4)
        flag = "--model.init_args.blr" if use_blr else "--model.init_args.lr"
        extra = [flag, f"{float(current) / 10:.3g}", RESET_OPTIMIZER_FLAG, "true"]
        if found is None:
            lines.append("There is no finite checkpoint to resume from; start again with a lower learning rate "
                         f"({flag} {extra[1]}).")
            return "\n".join(lines)
        path, step = found
        lines.append(f"The last finite checkpoint is {path} (global step {step}). Resume it with a lower learning "
                     "rate and fresh optimizer state:")
        lines.append("  " + resume_command(path, extra))
        return "\n".join(lines)


def _describe(exception: BaseException) -> str:
    if isinstance(exception, SIGTERMException):
        return f"Interrupted by SIGTERM (signal {int(signal.SIGTERM)})"
    if isinstance(exception, KeyboardInterrupt):
        return "Interrupted (Ctrl-C)"
    text = str(exception).splitlines()[0] if str(exception) else ""
    return f"Stopped by {type(exception).__name__}{': ' + text if text else ''}"
