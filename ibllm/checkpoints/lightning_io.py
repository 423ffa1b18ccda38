"""Training checkpoints written in their own folder and renamed into place, on any filesystem.

Lightning's default writer stages a file in ``$TMPDIR`` and moves it; when ``$TMPDIR`` is on another
filesystem (a node-local ``/tmp``, a tmpfs) the move is a copy, so a process killed during it leaves a
truncated file under the final name and a full-size orphan in ``$TMPDIR``. Here every checkpoint is written
beside its target under a hidden name that carries the writer's process id, flushed to disk, then renamed:

* a single file ``X`` is written as ``.X.tmp-<pid>`` then ``os.replace``-d onto ``X``;
* a sharded folder ``X`` is written as the folder ``.X.tmp-<pid>``; the old ``X`` (if any) is renamed to
  ``.X.old-<pid>``, the new one to ``X``, then the old one is deleted.

A kill leaves at most such hidden leftovers, never a partial ``X``: :func:`clean_partial_saves` (run when
training starts) deletes the leftovers of dead writers and puts back an ``.X.old-<pid>`` whose
replacement never arrived.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ibllm.atomic import current_umask

log = logging.getLogger(__name__)

TMP_TAG, OLD_TAG = "tmp", "old"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-(?P<pid>\d+)$")


def hidden_sibling(path: Path, tag: str, pid: int | None = None) -> Path:
    """``.NAME.<tag>-<pid>`` beside ``path`` (the writer's own process id by default)."""
    return path.parent / f".{path.name}.{tag}-{os.getpid() if pid is None else pid}"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_file_atomic(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """``torch.save(checkpoint)`` to ``.NAME.tmp-<pid>`` beside ``path``, fsync, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_sibling(path, TMP_TAG)
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        if path.is_dir() and not path.is_symlink():  # a sharded checkpoint of the same name
            replace_folder(tmp, path)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        _remove(tmp)
        raise
    return path


def replace_folder(new: Path, path: Path) -> None:
    """Put the finished ``new`` (a folder or file) at ``path``, replacing what is there (see module doc)."""
    if path.exists() or path.is_symlink():
        old = hidden_sibling(path, OLD_TAG)
        os.replace(path, old)
        os.replace(new, path)
        _fsync_dir(path.parent)
        _remove(old)
    else:
        os.replace(new, path)
        _fsync_dir(path.parent)


def save_sharded_atomic(strategy: Any, save: Callable[[Path], None], path: str | Path) -> None:
    """Collective save of a sharded checkpoint folder: ``save(tmp)`` on every rank writes the folder
    ``.NAME.tmp-<pid of rank 0>``; rank 0 then renames it to ``path``. ``strategy`` gives ``broadcast``,
    ``barrier`` and ``global_rank``."""
    path = Path(path)
    tmp = Path(strategy.broadcast(str(hidden_sibling(path, TMP_TAG))))
    if strategy.global_rank == 0:
        _remove(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    strategy.barrier("ibllm_sharded_save_start")
    save(tmp)
    strategy.barrier("ibllm_sharded_save_written")
    if strategy.global_rank == 0:
        replace_folder(tmp, path)
    strategy.barrier("ibllm_sharded_save_done")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_partial_saves(folder: str | Path) -> list[str]:
    """Delete the leftovers of killed checkpoint writes in ``folder`` (writers no longer running); put back
    an old checkpoint whose replacement never arrived. Returns one line per action, for the log."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    actions = []
    for entry in sorted(folder.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match is None or _alive(int(match["pid"])):
            continue
        final = folder / match["name"]
        if match["tag"] == OLD_TAG and not final.exists():
            os.replace(entry, final)
            actions.append(f"restored {final} (its replacement was never completed)")
        else:
            _remove(entry)
            actions.append(f"removed {entry} (left by an interrupted checkpoint write)")
    return actions


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, except that local files are written beside the target and
    renamed (:func:`save_file_atomic`); remote URLs keep Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see the module doc)."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint(..., storage_options=...) is not supported")
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path)
            return
        save_file_atomic(checkpoint, path)


def use_atomic_checkpoint_io(strategy: Any) -> None:
    """Make ``strategy`` write checkpoint files with :class:`AtomicCheckpointIO`, unless the user configured
    another writer (a ``CheckpointIO`` plugin other than Lightning's default)."""
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
