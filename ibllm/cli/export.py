"""``python -m ibllm export``: export or import an adapter (official, safetensors or merged layout)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ibllm.checkpoints import export as export_module
from ibllm.checkpoints.export import FORMATS, export
from ibllm.cli.common import RECOVERABLE, fail


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm export CKPT --format official|safetensors|merged OUT``."""
    parser = argparse.ArgumentParser(prog="python -m ibllm export", description=export_module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="our checkpoint / safetensors export, or an official 7B.pth / 7B-pretrained.pth")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("out", help="output file (official, safetensors) or folder (merged)")
    parser.add_argument("--stage", choices=("pretrain", "finetune"), help="default: the checkpoint's stage")
    parser.add_argument("--init-from", help="stage-1 file to complete a stage-2 checkpoint with")
    parser.add_argument("--llama", "--llm", dest="llama", help="merged: base model (default: recorded in CKPT)")
    parser.add_argument("--tokenizer", help="merged: tokenizer file (default: the base model's)")
    parser.add_argument("--imagebind", help="merged: encoder weights to record (default: recorded in CKPT)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--no-check-base", action="store_true", help="merged: warn instead of failing on a "
                                                                     "base-model mismatch")
    args = parser.parse_args(argv)
    try:
        written = export(args.ckpt, args.format, args.out, args.stage, args.init_from, args.llama, args.tokenizer,
                         args.imagebind, args.force, not args.no_check_base)
    except RECOVERABLE as e:
        fail(e)
    print(f"wrote {written}")
