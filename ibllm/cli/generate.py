"""``python -m ibllm generate``: one-shot generation for scripts (plain text or ``--json``)."""

from __future__ import annotations

import json as json_module
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ibllm.cli.common import (LOAD_ALIASES, RECOVERABLE, InputOptions, ModelOptions, SamplingOptions, chosen_inputs,
                              fail, load_model)
from ibllm.verbs.errors import report
from ibllm.verbs.registry import run, verb


@verb("generate", flat=("model", "inputs", "sampling"), aliases=LOAD_ALIASES)
def generate(prompt: list[str] | None = None, prompts_file: str | None = None, raw: bool = False, json: bool = False,
             model: ModelOptions = ModelOptions(), inputs: InputOptions = InputOptions(),
             sampling: SamplingOptions = SamplingOptions(), argv: Sequence[str] = ()) -> None:
    """One-shot generation: every --prompt (or line of --prompts-file, '-' = stdin) is answered in one batch,
    conditioned on the inputs. Prompts are wrapped in the Alpaca instruction template unless --raw.

    Args:
        prompt: a prompt (repeatable: one batch)
        prompts_file: one prompt per line ('-' reads stdin)
        raw: send prompts as they are (already templated)
        json: print one JSON object (prompts, outputs, settings, timing)
        model: which model to load
        inputs: the inputs every prompt is conditioned on
        sampling: decoding settings
        argv: the command line as typed (the order of the input options)
    """
    prompts = list(prompt or [])
    if prompts_file:
        try:
            text = sys.stdin.read() if prompts_file == "-" else Path(prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(e)
        prompts += [ln for ln in text.splitlines() if ln.strip()]
    if not prompts:
        report("python -m ibllm generate", "give at least one --prompt (or --prompts-file)")
    try:
        chosen = chosen_inputs(inputs, argv)
        t0 = time.perf_counter()
        loaded = load_model(model)
        t1 = time.perf_counter()
        outputs = loaded.generate(chosen or None, prompts, max_gen_len=sampling.max_gen_len,
                                  temperature=sampling.temperature, top_p=sampling.top_p, template=not raw,
                                  seed=sampling.seed)
        t2 = time.perf_counter()
    except RECOVERABLE as e:
        fail(e)
    if json:
        report_ = {"results": [{"prompt": p, "output": o} for p, o in zip(prompts, outputs)],
                   "inputs": {m: {"item": str(item), "weight": w} for m, (item, w) in chosen.items()},
                   "settings": {"max_gen_len": sampling.max_gen_len, "temperature": sampling.temperature,
                                "top_p": sampling.top_p, "seed": sampling.seed, "template": not raw},
                   "model": {k: v for k, v in loaded.info.items()
                             if isinstance(v, (str, int, float, bool, type(None)))},
                   "timing_s": {"load": round(t1 - t0, 3), "generate": round(t2 - t1, 3)}}
        print(json_module.dumps(report_, ensure_ascii=False, indent=2))
    else:
        for i, out in enumerate(outputs):
            if len(outputs) > 1:
                print(f"[{i}] ", end="")
            print(out)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ibllm generate``."""
    run("generate", argv)
