"""``python -m ibllm generate``: one-shot generation for scripts (plain text or ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ibllm.cli.common import RECOVERABLE, add_load_arguments, fail, inputs_from_args, load_from_args


def build_generate_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m ibllm generate``."""
    parser = argparse.ArgumentParser(
        prog="python -m ibllm generate",
        description="One-shot generation: every --prompt (or line of --prompts-file, '-' = stdin) is answered "
                    "in one batch, conditioned on the inputs. Prompts are wrapped in the Alpaca instruction "
                    "template unless --raw.")
    add_load_arguments(parser)
    p = parser.add_argument_group("prompts and output")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: one batch)")
    p.add_argument("--prompts-file", help="one prompt per line ('-' reads stdin)")
    p.add_argument("--raw", action="store_true", help="send prompts as they are (already templated)")
    p.add_argument("--json", action="store_true", help="print one JSON object (prompts, outputs, settings, timing)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm generate``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_generate_parser()
    args = parser.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            text = sys.stdin.read() if args.prompts_file == "-" else Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(e)
        prompts += [ln for ln in text.splitlines() if ln.strip()]
    if not prompts:
        parser.error("give at least one --prompt (or --prompts-file)")
    try:
        inputs = inputs_from_args(args, argv)
        t0 = time.perf_counter()
        model = load_from_args(args)
        t1 = time.perf_counter()
        outputs = model.generate(inputs or None, prompts, max_gen_len=args.max_gen_len, temperature=args.temperature,
                                 top_p=args.top_p, template=not args.raw, seed=args.seed)
        t2 = time.perf_counter()
    except RECOVERABLE as e:
        fail(e)
    if args.json:
        report = {"results": [{"prompt": p, "output": o} for p, o in zip(prompts, outputs)],
                  "inputs": {m: {"item": str(item), "weight": w} for m, (item, w) in inputs.items()},
                  "settings": {"max_gen_len": args.max_gen_len, "temperature": args.temperature,
                               "top_p": args.top_p, "seed": args.seed, "template": not args.raw},
                  "model": {k: v for k, v in model.info.items() if isinstance(v, (str, int, float, bool, type(None)))},
                  "timing_s": {"load": round(t1 - t0, 3), "generate": round(t2 - t1, 3)}}
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        for i, out in enumerate(outputs):
            if len(outputs) > 1:
                print(f"[{i}] ", end="")
            print(out)
