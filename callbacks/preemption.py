"""SLURM preemption: run Lightning's save-and-requeue at a step boundary, on every rank at once.

Lightning's SLURM plugin (``SLURMEnvironment(auto_requeue=True)``, the default under SLURM) handles the
requeue signal (``#SBATCH --signal=SIGUSR1@90``) by saving ``hpc_ckpt_N.ckpt`` in ``default_root_dir``,
then ``scontrol requeue``; the requeued job finds the newest ``hpc_ckpt_N`` and resumes from it. But it
saves *inside the signal handler*, wherever each rank happens to be. With sharded (FSDP2) checkpoints the
save is a collective, and a rank interrupted inside a forward all-gather would pair its checkpoint
collectives with another rank's all-gather (a hang or a corrupt save). This callback only records the
signal; at the end of each training step the ranks agree (one all-reduce of a flag) and then all call
Lightning's own handler together, so the save happens at the same, consistent point on every rank.

Lightning never deletes an ``hpc_ckpt_N``: each requeue adds one (for a 7B stage-1 run, several GB of
trainables and optimizer state). Once a run has resumed, the older ones it no longer needs are deleted.
"""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ibllm.checkpoints.recovery import checkpoint_step
from ibllm.files import CheckpointError

log = logging.getLogger(__name__)

REQUEUE_CHECKPOINTS = "hpc_ckpt_*.ckpt"  # Lightning's names for the checkpoints saved at a SLURM requeue


def prune_requeue_checkpoints(folder: str | Path, restored: str | Path, restored_step: int) -> list[Path]:
    """Delete the requeue checkpoints in ``folder`` (``hpc_ckpt_N.ckpt``: files, or folders when sharded) that a
    run resumed from ``restored`` at global step ``restored_step`` no longer needs: every one except
    ``restored`` itself that holds at most ``restored_step`` steps. One that cannot be read, or that holds more
    steps (the user chose to resume from an earlier point), is kept. Returns the deleted paths."""
    keep = Path(restored).resolve()
    deleted = []
    for path in sorted(Path(folder).glob(REQUEUE_CHECKPOINTS)):
        if path.resolve() == keep:
            continue
        try:
            step = checkpoint_step(path)
        except CheckpointError:
            continue
        if step > restored_step:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        deleted.append(path)
    return deleted


class RequeueAtStepEnd(L.Callback):
    """Defer Lightning's SLURM auto-requeue (save ``hpc_ckpt``, ``scontrol requeue``) to a step boundary, and
    delete the older ``hpc_ckpt`` files once a run has resumed (:func:`prune_requeue_checkpoints`).

    The deferral is a no-op outside SLURM or when auto-requeue is off. After the requeue the run stops
    cleanly (SLURM ends the job and starts it again; the new run resumes from the newest checkpoint).
    """

    def __init__(self) -> None:
        self._requested = False
        self._signum: int | None = None
        self._handler: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Delete the requeue checkpoints the resumed run no longer needs (global rank 0), then swap Lightning's
        requeue-signal handler (registered just before training) for a flag setter."""
        from lightning.fabric.plugins.environments import SLURMEnvironment

        if trainer.ckpt_path and trainer.is_global_zero:  # training state restored: global_step is the resumed one
            for path in prune_requeue_checkpoints(trainer.default_root_dir, trainer.ckpt_path, trainer.global_step):
                log.warning("deleted the requeue checkpoint %s (the run resumed at global step %d)", path,
                            trainer.global_step)

        env = trainer._accelerator_connector.cluster_environment
        if not isinstance(env, SLURMEnvironment) or not env.auto_requeue or env.requeue_signal is None:
            return
        current = signal.getsignal(env.requeue_signal)
        if not callable(current) or current == self._flag:
            return
        self._signum, self._handler = env.requeue_signal, current
        signal.signal(env.requeue_signal, self._flag)

    def _flag(self, signum: int, frame: Any) -> None:
        self._requested = True

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        """If any rank got the signal: every rank runs Lightning's save + requeue now, then training stops."""
        if self._handler is None:
            return
        flag = torch.tensor([int(self._requested)], device=trainer.strategy.root_device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not int(flag.item()):
            return
        log.warning("requeue signal received: saving at global step %d and requeueing", trainer.global_step)
        self._requested = False
        self._handler(self._signum, None)
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Give the signal back to Lightning's handler (it restores the original ones at teardown)."""
        if self._handler is not None and self._signum is not None:
            signal.signal(self._signum, self._handler)
            self._handler = None
