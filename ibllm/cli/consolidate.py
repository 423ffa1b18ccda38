"""``python -m ibllm consolidate``: the trainable-only adapter file of a sharded (FSDP2) checkpoint folder."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ibllm.checkpoints.consolidate import consolidate
from ibllm.cli.common import RECOVERABLE, fail


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm consolidate CKPT_DIR --out FILE [--format official|safetensors]``."""
    parser = argparse.ArgumentParser(
        prog="python -m ibllm consolidate",
        description="Write the trainable-only adapter file of a sharded (FSDP2) checkpoint folder, offline "
                    "in one process (no GPUs, no torch.distributed).")
    parser.add_argument("ckpt", help="sharded checkpoint folder (e.g. runs/X/checkpoints/last.ckpt/) or a .ckpt file")
    parser.add_argument("--out", required=True, help="output file (.pth for official, .safetensors)")
    parser.add_argument("--format", default="official", choices=("official", "safetensors"))
    parser.add_argument("--stage", choices=("pretrain", "finetune"), help="default: the checkpoint's stage")
    parser.add_argument("--init-from", help="stage-1 file to complete a stage-2 checkpoint with "
                                            "(default: the init_from recorded in the checkpoint)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        written = consolidate(args.ckpt, args.out, args.format, args.stage, args.init_from, args.force)
    except RECOVERABLE as e:
        fail(e)
    print(f"wrote {written}")
