"""``python -m ibllm export``: export or import an adapter (official, safetensors or merged layout)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ibllm.checkpoints import export as export_module
from ibllm.checkpoints.export import export
from ibllm.cli.common import RECOVERABLE, fail
from ibllm.verbs.registry import run, verb


@verb("export", positional=("ckpt", "out"), aliases={"--llm": "--llama"}, description=export_module.__doc__)
def export_command(ckpt: str, out: str, format: Literal["official", "safetensors", "merged"],
                   stage: Literal["pretrain", "finetune"] | None = None, init_from: str | None = None,
                   llama: str | None = None, tokenizer: str | None = None, imagebind: str | None = None,
                   force: bool = False, check_base: bool = True) -> Path:
    """Export (or import) an adapter: ``CKPT --format official|safetensors|merged OUT``.

    Args:
        ckpt: our checkpoint / safetensors export, or an official 7B.pth / 7B-pretrained.pth
        out: output file (official, safetensors) or folder (merged)
        format: the layout to write
        stage: default: the checkpoint's stage
        init_from: stage-1 file to complete a stage-2 checkpoint with
        llama: merged: base model (default: recorded in CKPT)
        tokenizer: merged: tokenizer file (default: the base model's)
        imagebind: merged: encoder weights to record (default: recorded in CKPT)
        force: replace an existing output
        check_base: merged: fail on a base-model mismatch (false, or --no-check-base: warn instead)
    """
    try:
        written = export(ckpt, format, out, stage, init_from, llama, tokenizer, imagebind, force, check_base)
    except RECOVERABLE as e:
        fail(e)
    print(f"wrote {written}")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm export CKPT --format official|safetensors|merged OUT``."""
    run("export", argv)
