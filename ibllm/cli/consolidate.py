"""``python -m ibllm consolidate``: the trainable-only adapter file of a sharded (FSDP2) checkpoint folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ibllm.checkpoints.consolidate import consolidate
from ibllm.cli.common import RECOVERABLE, fail
from ibllm.verbs.registry import run, verb


@verb("consolidate", positional=("ckpt",))
def consolidate_command(ckpt: str, out: str, format: Literal["official", "safetensors"] = "official",
                        stage: Literal["pretrain", "finetune"] | None = None, init_from: str | None = None,
                        force: bool = False) -> Path:
    """Write the trainable-only adapter file of a sharded (FSDP2) checkpoint folder, offline in one process
    (no GPUs, no torch.distributed).

    Args:
        ckpt: sharded checkpoint folder (e.g. runs/X/checkpoints/last.ckpt/) or a .ckpt file
        out: output file (.pth for official, .safetensors)
        format: the layout to write
        stage: default: the checkpoint's stage
        init_from: stage-1 file to complete a stage-2 checkpoint with (default: the init_from recorded in
            the checkpoint)
        force: replace an existing output
    """
    try:
        written = consolidate(ckpt, out, format, stage, init_from, force)
    except RECOVERABLE as e:
        fail(e)
    print(f"wrote {written}")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm consolidate CKPT_DIR --out FILE [--format official|safetensors]``."""
    run("consolidate", argv)
