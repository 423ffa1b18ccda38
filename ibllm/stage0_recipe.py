"""Stage-0 recipes and the tower files they produce.

A recipe (:class:`BindRecipe`, extended by each demo) records every setting of :func:`ibllm.stage0.bind_towers`
that determines a trained tower; the sha256 of its canonical JSON (:meth:`BindRecipe.digest`) names the
file's content. A tower file is a flat ImageBind state dict (safetensors, or ``torch.save`` for other
suffixes) written atomically, with a JSON report beside it recording the recipe hash and the file's sha256:
:func:`existing_tower_info` finds a finished build of the same recipe, so builds are idempotent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ibllm.atomic import atomic_write


@dataclass
class BindRecipe:
    """The :func:`ibllm.stage0.bind_towers` settings every stage-0 recipe records (its hash names the content).

    Attributes:
        cfg: ImageBind preset whose towers are trained
        seed: seed of the split, the initialisation and the sampling
        heldout_fraction: share of the labelled data held out for the zero-shot evaluation
        steps: optimizer steps
        lr: peak AdamW learning rate
        warmup: linear warmup steps
        min_lr_ratio: the cosine decay ends at this fraction of lr
        weight_decay: AdamW weight decay (embeddings and tokens undecayed)
        batch_size: pairs per step
        bf16: bf16 autocast (false, or --fp32: float32)
        augment: train on the stage-1 crop augmentation (false, or --no-augment: centre views only)
        pos_init_scale: RMS of the sine-cosine positional embedding trained patch branches start from (0: off)
        intra_weight: weight of the class-aware InfoNCE among the new branch's own embeddings (0: off)
    """

    cfg: str = "demo"
    seed: int = 0
    heldout_fraction: float = 0.2
    steps: int = 500
    lr: float = 2e-3
    warmup: int = 30
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.05
    batch_size: int = 128
    bf16: bool = True
    augment: bool = True
    pos_init_scale: float = 1.0
    intra_weight: float = 1.0

    def digest(self, **extra: str) -> str:
        """sha256 of the recipe's canonical JSON (with ``extra`` entries, e.g. a base encoder's sha256)."""
        blob = json.dumps({**dataclasses.asdict(self), **extra}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def bind_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`ibllm.stage0.bind_towers` this recipe fixes."""
        return {"steps": self.steps, "lr": self.lr, "warmup": self.warmup, "batch_size": self.batch_size,
                "seed": self.seed, "min_lr_ratio": self.min_lr_ratio, "weight_decay": self.weight_decay,
                "bf16": self.bf16, "pos_init_scale": self.pos_init_scale, "intra_weight": self.intra_weight}


@dataclass
class TowerFile:
    """A built (or reused) tower file: its path, its JSON report and whether this call trained it."""

    path: Path
    info_path: Path
    info: dict[str, Any]
    trained: bool

    @property
    def accuracy(self) -> float:
        """The report's headline held-out zero-shot accuracy (``accuracy.heldout_centre``)."""
        return float(self.info["accuracy"]["heldout_centre"])


def info_path_for(out_path: str | Path) -> Path:
    """The JSON written next to a tower file: ``<name>.json`` (suffix replaced)."""
    return Path(out_path).with_suffix(".json")


def existing_tower_info(out_path: Path, info_path: Path, digest: str) -> dict[str, Any] | None:
    """The report of a finished build of recipe ``digest`` at ``out_path`` (file intact by sha256), else None."""
    if not (out_path.is_file() and info_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("recipe_hash") != digest or info.get("sha256") != file_sha256(out_path):
        return None
    return info


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state_dict(state: dict[str, Tensor], path: str | Path) -> str:
    """Write a flat state dict atomically (``.safetensors``: safetensors, else ``torch.save``); returns its sha256."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    digest = ""

    def write(tmp: str) -> None:
        nonlocal digest
        if path.suffix == ".safetensors":
            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
        digest = file_sha256(tmp)

    atomic_write(path, write)
    return digest
