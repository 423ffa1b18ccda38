"""Choosing what to resume from, and recovering from interruptions and divergence.

* :func:`resolve_resume`: the checkpoint a ``fit`` resumes from. Lightning's ``ckpt_path="last"`` (automatic
  when an exception-checkpoint callback is configured) takes the newest *file*; here it is the highest
  ``global_step`` among the folder's ``last*.ckpt``, the interruption checkpoint and SLURM's ``hpc_ckpt``,
  and any other choice (an unreadable candidate skipped, a newer file with fewer steps) is said aloud.
* :func:`check_finite_trainables`: after an optimizer step, stop at the step where a weight stops being finite.
* :func:`reset_optimizer_state`: fresh AdamW moments and a new peak lr on resume (after a divergence).
* :func:`resume_command`: the exact command line that resumes this run from a given checkpoint.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ibllm import tuning
from ibllm.checkpoints.io import safe_load
from ibllm.checkpoints.sharded import is_sharded_folder, read_sharded_meta
from ibllm.files import CheckpointError

RESET_OPTIMIZER_FLAG = "--model.init_args.reset_optimizer"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint's dict (weights-only; a sharded folder gives its ``meta.pt`` part)."""
    return read_sharded_meta(path) if is_sharded_folder(path) else safe_load(path, "training checkpoint")


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` a training checkpoint was saved at (:class:`CheckpointError` when unreadable)."""
    step = read_checkpoint(path).get("global_step")
    if not isinstance(step, int):
        raise CheckpointError(f"{path}: not a training checkpoint (no global_step)")
    return step


def is_finite_checkpoint(path: str | Path) -> bool:
    """True when every floating tensor of the checkpoint's weights is finite (sharded folders: assumed,
    their weights were checked at every step before they were saved)."""
    if is_sharded_folder(path):
        return True
    state = read_checkpoint(path).get("state_dict") or {}
    return all(bool(torch.isfinite(t).all()) for t in state.values() if isinstance(t, Tensor) and t.is_floating_point())


def rank_checkpoints(paths: Iterable[str | Path]) -> tuple[list[tuple[int, float, Path]], list[str]]:
    """Readable checkpoints as ``(global_step, mtime, path)``, best first (most steps, then newest), and
    one note per candidate that could not be read."""
    ranked, notes = [], []
    for raw in dict.fromkeys(str(p) for p in paths if p):
        path = Path(raw)
        if not path.exists():
            continue
        try:
            ranked.append((checkpoint_step(path), path.stat().st_mtime, path))
        except CheckpointError as e:
            notes.append(f"skipping {path}: {e}")
    ranked.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return ranked, notes


def resume_candidates(trainer: Any) -> list[Path]:
    """What Lightning's ``ckpt_path="last"`` chooses among: ``last*.ckpt`` of every ModelCheckpoint, the
    exception checkpoints and (under SLURM) the newest ``hpc_ckpt``."""
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    found: list[Path] = [Path(cb.ckpt_path) for cb in trainer.callbacks if isinstance(cb, OnExceptionCheckpoint)]
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            found += [Path(p) for p in cb._find_last_checkpoints(trainer)]
    hpc = getattr(trainer._checkpoint_connector, "_hpc_resume_path", None)
    if hpc:
        found.append(Path(hpc))
    return found


def resolve_resume(trainer: Any, ckpt_path: str | None, say: Any = print) -> str | None:
    """The checkpoint ``fit`` should resume from, given the user's ``ckpt_path``.

    ``"last"``, or None with an exception-checkpoint callback configured (Lightning then resumes
    automatically), becomes the readable candidate with the highest ``global_step``. An explicit path is
    checked (a missing or unreadable file raises :class:`CheckpointError` naming it) and kept; a note is said
    when its folder holds a checkpoint with more steps.
    """
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    automatic = ckpt_path is None and any(isinstance(cb, OnExceptionCheckpoint) for cb in trainer.callbacks)
    if ckpt_path not in (None, "last") or (ckpt_path is None and not automatic):
        if ckpt_path not in (None, "last", "best", "hpc") and "://" not in str(ckpt_path):
            _note_newer(Path(ckpt_path), say)
        return ckpt_path
    ranked, notes = rank_checkpoints(resume_candidates(trainer))
    for note in notes:
        say(note)
    if not ranked:
        return ckpt_path
    step, _, best = ranked[0]
    newest = max(ranked, key=lambda item: item[1])
    if newest[2] != best:
        say(f"resuming from {best} (global step {step}), not from the newer file {newest[2]} "
            f"(global step {newest[0]})")
    return str(best)


def _note_newer(path: Path, say: Any) -> None:
    """Check that ``path`` is a readable training checkpoint (:class:`CheckpointError` naming it, before
    anything is built) and say so when its folder holds a checkpoint with more steps."""
    if not path.exists():
        raise CheckpointError(f"--ckpt_path: no such checkpoint: {path}")
    step = checkpoint_step(path)
    siblings = [p for p in path.parent.glob("*.ckpt") if p != path]
    ranked, _ = rank_checkpoints(siblings)
    if ranked and ranked[0][0] > step:
        say(f"note: resuming from {path} (global step {step}); {ranked[0][2]} in the same folder has "
            f"global step {ranked[0][0]}")


def last_finite_checkpoint(folders: Iterable[str | Path], extra: Iterable[str | Path] = ()) -> tuple[Path, int] | None:
    """The checkpoint with the most steps, among the ``*.ckpt`` in ``folders`` and ``extra``, whose weights
    are all finite; None if there is none."""
    paths = [p for folder in folders if folder and Path(folder).is_dir() for p in Path(folder).glob("*.ckpt")]
    ranked, _ = rank_checkpoints([*paths, *extra])
    for step, _, path in ranked:
        try:
            if is_finite_checkpoint(path):
                return path, step
        except CheckpointError:
            continue
    return None


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def check_finite_trainables(model: nn.Module, stage: str, global_step: int, agree: bool = True) -> None:
    """Raise ``FloatingPointError`` naming the step and the first tensors when a trainable weight is not
    finite. With ``agree`` (a training step) all ranks agree through one all-reduce, so they stop together;
    without it only this rank's tensors are checked (no collective, e.g. while handling an exception)."""
    params = [(n, p) for n, p in tuning.trainable_parameters(model, stage)]
    if not params:
        return
    flags = torch.stack([torch.isfinite(_local(p.detach())).all() for _, p in params])
    bad = (~flags).sum().reshape(1).to(torch.int32)
    if agree and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad)
    if int(bad.item()) == 0:
        return
    names = [n for (n, _), ok in zip(params, flags.tolist()) if not ok]
    raise FloatingPointError(f"non-finite trainable weights after the optimizer step to global step {global_step}: "
                             f"{names[:3]}{' ...' if len(names) > 3 else ''}; stopping")


def reset_optimizer_state(trainer: Any, peak_lr: float) -> None:
    """Forget optimizer moments and step counts and put the lr schedule's peak at ``peak_lr``, keeping its
    position (the schedule continues at the restored step, scaled to the new peak)."""
    for optimizer in trainer.optimizers:
        optimizer.state.clear()
        for group in optimizer.param_groups:
            old_peak = group.get("initial_lr", group["lr"]) or 1.0
            group["lr"] = group["lr"] * peak_lr / old_peak if old_peak else peak_lr
            group["initial_lr"] = peak_lr
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [peak_lr] * len(scheduler.base_lrs)
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def launch_command() -> list[str]:
    """How this process was started, as a command a user can type (``python -m ibllm ...`` for our CLI)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if argv0.name == "__main__.py" and argv0.parent.name == "ibllm":
        return ["python", "-m", "ibllm", *sys.argv[1:]]
    return ["python", os.path.relpath(argv0) if argv0.is_absolute() else str(argv0), *sys.argv[1:]]


def resume_command(ckpt: str | Path, extra: Iterable[str] = (), argv: list[str] | None = None) -> str:
    """``argv`` (default: this process's command) with ``--ckpt_path ckpt`` and ``extra`` flags in place of
    any earlier values of the same flags, shell-quoted."""
    words = list(launch_command() if argv is None else argv)
    extra = list(extra)
    replaced = {"--ckpt_path", *[w for w in extra if w.startswith("--")]}
    out: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
            continue
        flag = word.split("=", 1)[0]
        if flag in replaced:
            skip = "=" not in word
            continue
        out.append(word)
    return shlex.join([*out, "--ckpt_path", str(ckpt), *extra])
