"""Load LLaMA weights from any supported format: Meta folder, Hugging Face folder or GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch

from ibllm.checkpoints.gguf import load_gguf_llama
from ibllm.checkpoints.hf import load_hf_llama
from ibllm.checkpoints.io import CheckpointError, PathLike, StateDict
from ibllm.checkpoints.meta import load_meta_llama
from ibllm.config import LLaMAConfig


def load_llama(path: PathLike, dtype: torch.dtype = torch.float32) -> tuple[LLaMAConfig, StateDict]:
    """Load LLaMA weights from whatever ``path`` is: a Meta folder (``params.json``), a Hugging Face folder
    (``config.json``), a ``.gguf`` file, or a folder holding exactly one ``.gguf`` file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return load_gguf_llama(p, dtype)
    if p.is_dir():
        if (p / "params.json").is_file():
            return load_meta_llama(p, dtype)
        if (p / "config.json").is_file():
            return load_hf_llama(p, dtype)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf_llama(ggufs[0], dtype)
        raise CheckpointError(f"{p}: not a LLaMA folder (no params.json, config.json or single .gguf file)")
    if not p.exists():
        raise CheckpointError(f"LLaMA checkpoint not found: {p}")
    raise CheckpointError(f"{p}: unrecognised LLaMA checkpoint (expected a folder or a .gguf file)")

