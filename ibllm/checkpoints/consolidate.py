"""Consolidation: a sharded (FSDP2) checkpoint folder -> the trainable-only adapter file.

Lightning saves a sharded checkpoint as a directory (torch.distributed.checkpoint: one file per rank, a
``.metadata`` index and ``meta.pt`` with the non-tensor state) holding the trainable tensors only. This
module reads such a folder in one process, offline (no GPUs, no process group), and writes the official
layout or our safetensors export (the ``python -m ibllm consolidate`` verb).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ibllm.checkpoints.adapters import Adapter, add_stage1
from ibllm.checkpoints.export import export, export_official, export_safetensors
from ibllm.checkpoints.io import SHARDED_META_FILE, CheckpointError
from ibllm.checkpoints.sharded import SafeFileSystemReader, read_sharded_meta, safe_dcp_load
from ibllm.tuning import is_trainable


def read_sharded_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a sharded (DCP directory) checkpoint of ours in one process, without torch.distributed.

    Returns ``(state, meta)``: the full (unsharded) trainable tensors under our names (``model.`` prefix
    removed) and the ``ibllm`` metadata plus ``init_from`` / ``tokenizer`` from the hyper-parameters.
    """
    p = Path(path)
    if not p.is_dir() or not (p / ".metadata").is_file():
        raise CheckpointError(f"{p}: not a sharded checkpoint folder (no .metadata file)")
    reader = SafeFileSystemReader(str(p))
    entries = reader.read_metadata().state_dict_metadata  # refuses anything but DCP metadata classes
    try:
        # A template of full-size tensors for the model keys only (optimizer states are not read).
        tensors = {key.removeprefix("state_dict."): torch.empty(tuple(m.size), dtype=m.properties.dtype)
                   for key, m in entries.items()
                   if key.startswith("state_dict.") and isinstance(m, TensorStorageMetadata)}
        template = {"state_dict": tensors}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            safe_dcp_load(template, p, no_dist=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # corrupt / partial folders: one clear message
        raise CheckpointError(f"{p}: cannot read the sharded checkpoint ({type(e).__name__}: {e})") from e
    state = {k.removeprefix("model."): v for k, v in tensors.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"{p}: the sharded checkpoint holds no model tensors")
    meta: dict[str, Any] = {}
    if (p / SHARDED_META_FILE).is_file():
        raw = read_sharded_meta(p)
        meta = dict(raw.get("ibllm") or {})
        hp = raw.get("hyper_parameters") or {}
        meta.setdefault("init_from", hp.get("init_from"))
        meta.setdefault("tokenizer", hp.get("tokenizer"))
    return state, meta


def consolidate(ckpt: str | Path, out: str | Path, fmt: str = "official", stage: str | None = None,
                init_from: str | None = None, force: bool = False) -> Path:
    """Write the trainable-only file of a sharded checkpoint folder (or of a single-file checkpoint).

    ``official`` writes the official key set of the stage (a stage-2 checkpoint is completed with the
    stage-1 tensors of its ``init_from``, like ``ibllm export``); ``safetensors`` writes our names plus a
    JSON config. Both are written atomically. Returns the written path.
    """
    if fmt not in ("official", "safetensors"):
        raise ValueError(f"unknown format {fmt!r}; choose official or safetensors")
    src, out = Path(ckpt), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such checkpoint")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    if not src.is_dir():  # an ordinary single-file checkpoint: same as `ibllm export`
        return export(src, fmt, out, stage, init_from, force=True)
    state, meta = read_sharded_checkpoint(src)
    if not any(is_trainable(k, "pretrain") or is_trainable(k, "finetune") for k in state):
        raise CheckpointError(f"{src}: no trainable tensors in the checkpoint")
    adapter = Adapter(state, "lightning", str(src), meta)
    needs_stage1 = adapter.stage == "finetune" and not adapter.has_stage1
    parent_path = init_from or (meta.get("init_from") if needs_stage1 else None)
    if parent_path:
        add_stage1(adapter, parent_path)
    return export_official(adapter, out, stage) if fmt == "official" else export_safetensors(adapter, out, stage)
