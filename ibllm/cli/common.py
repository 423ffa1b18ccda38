"""What the ``chat``, ``generate`` and ``serve`` commands share: the ``ibllm.load`` options, the input
flags, loading, and one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ibllm.api import MEDIA, InferenceModel, load

# Errors a command reports as one line (bad files, inputs or options) instead of a traceback.
RECOVERABLE = (ValueError, OSError, RuntimeError, KeyError)


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ibllm.load`` options shared by ``chat`` and ``generate``."""
    g = parser.add_argument_group("model")
    g.add_argument("--adapter", help="our checkpoint / .safetensors export, an official 7B.pth or "
                                     "7B-pretrained.pth, or a merged export folder")
    g.add_argument("--llama", "--llm", dest="llama", help="base LLaMA: Meta/HF folder, GGUF file, "
                                                         "smollm2-135m-instruct (default: recorded in the adapter)")
    g.add_argument("--tokenizer", help="tokenizer file (default: the base model's)")
    g.add_argument("--imagebind", help="ImageBind weights (imagebind_huge.pth / imagebind_w3D.pth layout)")
    g.add_argument("--imagebind-preset", help="skip the encoder preset guess (huge, huge_w3d, demo, tiny)")
    g.add_argument("--cache", help="visual cache index (cache-enhanced inputs)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    g.add_argument("--max-seq-len", type=int, default=None, help="context length (default: the adapter's)")
    g.add_argument("--merge", action="store_true", help="fold LoRA into the base weights (faster decoding)")
    g.add_argument("--no-check-base", action="store_true", help="warn instead of failing on a base-model mismatch")
    m = parser.add_argument_group("inputs")
    for name in MEDIA:
        m.add_argument(f"--{name}", help=f"{name} input" + (" (a string)" if name == "text" else " file"))
    m.add_argument("--weights", help="comma-separated modality weights, in the order the input flags were given")
    s = parser.add_argument_group("sampling")
    s.add_argument("--max-gen-len", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.1)
    s.add_argument("--top-p", type=float, default=0.75)
    s.add_argument("--seed", type=int, default=None)


def inputs_from_args(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, tuple[str, float]]:
    """``{modality: (item, weight)}`` from the input flags; ``--weights`` follow the flags' order in ``argv``."""
    order: list[str] = []
    for token in argv:
        name = token[2:].split("=", 1)[0] if token.startswith("--") else None
        if name in MEDIA and getattr(args, name) is not None and name not in order:
            order.append(name)
    weights = [1.0] * len(order)
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise ValueError(f"--weights {args.weights!r}: expected comma-separated numbers") from None
        if len(weights) != len(order):
            raise ValueError(f"--weights has {len(weights)} values for {len(order)} inputs ({', '.join(order)})")
    return {name: (getattr(args, name), w) for name, w in zip(order, weights)}


def load_from_args(args: argparse.Namespace) -> InferenceModel:
    """``ibllm.load`` with the parsed options."""
    return load(adapter=args.adapter, llama=args.llama, tokenizer=args.tokenizer, imagebind=args.imagebind,
                cache=args.cache, device=args.device, dtype=args.dtype, imagebind_preset=args.imagebind_preset,
                max_seq_len=args.max_seq_len, check_base=not args.no_check_base, merge=args.merge)


def one_line(err: BaseException) -> str:
    """An exception as one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def fail(err: BaseException) -> None:
    """Print ``error: ...`` (one line) to stderr and exit with status 1."""
    print(f"error: {one_line(err)}", file=sys.stderr)
    raise SystemExit(1)

