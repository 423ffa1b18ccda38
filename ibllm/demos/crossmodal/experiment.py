"""The cross-modal experiment: the stage-1 demo model saw only digit *images*; it now captions held-out inputs
of three modalities — images (the held-out shard), text phrases through the text tower (:data:`TEXT_TEMPLATES`,
none of them a training caption) and held-out spoken digits through the audio tower — each naively and with the
visual cache of the training images, and a greedy caption counts as correct when it names exactly the right
digit (the stage-1 demo metric). ``python -m ibllm crossmodal`` (``make crossmodal``) prints one line per cell:
``crossmodal_accuracy input=audio cache=on: 0.xx``.
"""

from __future__ import annotations

import json as json_module
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

import ibllm
from ibllm.atomic import write_bytes_atomic
from ibllm.cache import load_cache
from ibllm.demos.crossmodal.audio_tower import DEFAULT_ROOT, AudioRecipe, build_audio_encoder
from ibllm.demos.crossmodal.speech import SPEECH_DIR, SpokenDigits, speech_features, write_spoken_digits
from ibllm.demos.digits.callbacks import greedy_answers, read_labelled_shards
from ibllm.demos.digits.captions import DIGIT_WORDS, caption_names_digit
from ibllm.processing.image import load_image
from ibllm.processing.templates import caption_prompt
from ibllm.verbs.registry import run, verb

DEFAULT_ADAPTER = Path("runs/demo_pretrain/checkpoints/last.ckpt")
# Text inputs of the experiment: phrasings no training caption uses (see
# ibllm.demos.digits.captions.CAPTION_TEMPLATES).
TEXT_TEMPLATES: tuple[str, ...] = (
    "a handwritten {w}",
    "someone wrote the number {w} by hand",
    "a drawing of the figure {w}",
    "the numeral {w} scribbled on paper",
    "a picture of a {w}",
    "a sketch of the digit {w}",
)
INPUTS: tuple[str, ...] = ("image", "text", "audio")


@dataclass
class InputSet:
    """Held-out inputs of one modality: ``items`` (a batch tensor or a list of strings) and labels."""

    modality: str
    items: Tensor | list[str]
    labels: list[int]
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, start: int, stop: int) -> Tensor | list[str]:
        """Items ``start:stop``."""
        return self.items[start:stop]


@dataclass
class CellResult:
    """One table cell: accuracy over ``n`` inputs plus a few example captions."""

    modality: str
    cache: bool
    correct: int
    n: int
    examples: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.n)

    def line(self) -> str:
        """``crossmodal_accuracy input=audio cache=on: 0.42``."""
        return f"crossmodal_accuracy input={self.modality} cache={'on' if self.cache else 'off'}: {self.accuracy:.2f}"


def text_inputs(templates: Sequence[str] = TEXT_TEMPLATES) -> InputSet:
    """Every digit in every phrasing of ``templates`` (``{w}`` = word, ``{n}`` = numeral)."""
    texts, labels = [], []
    for t in templates:
        for d, w in enumerate(DIGIT_WORDS):
            texts.append(t.format(w=w, n=d))
            labels.append(d)
    return InputSet("text", texts, labels, list(texts))


def image_inputs(heldout: str | Sequence[str], limit: int | None = None) -> InputSet:
    """Held-out digit images of the demo shards, preprocessed like the stage-1 evaluation."""
    samples = read_labelled_shards(heldout, limit)
    if not samples:
        raise ValueError(f"no labelled images in {heldout}")
    images = torch.stack([load_image(png) for png, _ in samples])
    return InputSet("image", images, [int(lab) for _, lab in samples])


def audio_inputs(speech: SpokenDigits, split: str = "heldout", progress: bool = True) -> InputSet:
    """Spoken digits of ``split`` as ImageBind audio inputs ``[N,3,1,128,204]``."""
    paths = speech.paths(split)
    return InputSet("audio", speech_features(paths, progress), speech.labels(split).tolist(),
                    [Path(p).name for p in paths])


@torch.no_grad()
def caption_cell(model: torch.nn.Module, tokenizer: Any, inputs: InputSet, cache: Any = None, batch_size: int = 60,
                 max_gen_len: int = 16) -> CellResult:
    """Greedy stage-1 captions of ``inputs`` (cache-enhanced when ``cache``), scored by the demo metric."""
    result = CellResult(inputs.modality, cache is not None, 0, len(inputs))
    for start in range(0, len(inputs), batch_size):
        rows = inputs.rows(start, start + batch_size)
        labels = inputs.labels[start:start + batch_size]
        visual = model.bind(model.encode({inputs.modality: rows}, cache=cache))
        captions = greedy_answers(model, tokenizer, visual, [caption_prompt()] * len(labels), max_gen_len)
        for i, (caption, label) in enumerate(zip(captions, labels)):
            ok = caption_names_digit(caption, label)
            result.correct += ok
            name = inputs.names[start + i] if inputs.names else ""
            result.examples.append(f"[{label}] {name + ' -> ' if name else ''}{caption!r} {'✓' if ok else '✗'}")
    return result


def run_crossmodal(model: torch.nn.Module, tokenizer: Any, inputs: Sequence[InputSet], cache: Any,
                   batch_size: int = 60, max_gen_len: int = 16, echo: Callable[[str], None] | None = print,
                   examples: int = 0) -> list[CellResult]:
    """Every input set naive and with ``cache``; ``echo`` gets one line per cell (and ``examples`` captions)."""
    results = []
    for inp in inputs:
        for cached in (False, True):
            cell = caption_cell(model, tokenizer, inp, cache if cached else None, batch_size, max_gen_len)
            results.append(cell)
            if echo is not None:
                for line in cell.examples[:examples]:
                    echo("  " + line)
                echo(cell.line())
    return results


def markdown_table(results: Sequence[CellResult]) -> str:
    """The README table: one row per input modality, naive and cache columns."""
    cells = {(r.modality, r.cache): r for r in results}
    lines = ["| input (held-out) | n | naive | with visual cache |", "|---|---|---|---|"]
    for m in dict.fromkeys(r.modality for r in results):
        off, on = cells.get((m, False)), cells.get((m, True))
        n = (off or on).n
        lines.append(f"| {m} | {n} | {off.accuracy:.2f} | {on.accuracy:.2f} |" if off and on else f"| {m} | {n} | | |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI

@verb("crossmodal")
def crossmodal_command(root: str = str(DEFAULT_ROOT), adapter: str = str(DEFAULT_ADAPTER), llama: str | None = None,
                       cache: str | None = None, cache_k: int = 10, cache_t: float = 20.0, cache_w: float = 0.5,
                       audio_steps: int | None = None, inputs: str = ",".join(INPUTS), limit: int | None = None,
                       batch_size: int = 60, examples: int = 3, json: str | None = None,
                       quiet: bool = False) -> list[CellResult]:
    """Cross-modal transfer on the demo (paper Fig. 4): bind a spoken-digit audio tower to the frozen demo
    vision tower (once; espeak-ng), then caption held-out images, text phrases and spoken digits with the
    image-only stage-1 model, naive and with the visual cache. Prints one line per cell:
    crossmodal_accuracy input=audio cache=on: 0.xx

    Args:
        root: demo assets folder
        adapter: stage-1 checkpoint trained on images only
        llama: base LLM (default: the one recorded in the adapter)
        cache: visual cache folder (default ROOT/cache)
        cache_k: neighbours per query
        cache_t: cache softmax temperature
        cache_w: cache weight
        audio_steps: override the audio tower's step count
        inputs: comma list of image,text,audio
        limit: at most N held-out images (default all)
        batch_size: captions per generation batch
        examples: example captions printed per cell
        json: also write the results (and table) to this JSON file
        quiet: no progress bars
    """
    args = SimpleNamespace(**locals())
    root = Path(args.root)
    wanted = [m.strip() for m in args.inputs.split(",") if m.strip()]
    bad = [m for m in wanted if m not in INPUTS]
    if bad:
        raise SystemExit(f"--inputs: unknown input {bad[0]!r}; choose from {', '.join(INPUTS)}")
    adapter = Path(args.adapter)
    if not adapter.is_file():
        raise SystemExit(f"no stage-1 checkpoint at {adapter}: run `make pretrain` first (the image-only demo "
                         "model this experiment transfers from)")
    cache_dir = Path(args.cache) if args.cache else root / "cache"
    if not cache_dir.exists():
        raise SystemExit(f"no visual cache at {cache_dir}: run `make cache` first")
    heldout = root / "shards" / "heldout"
    if "image" in wanted and not heldout.exists():
        raise SystemExit(f"no held-out digit shards in {heldout}: run `python -m ibllm demo prepare` first")
    progress = not args.quiet
    recipe = AudioRecipe() if args.audio_steps is None else AudioRecipe(steps=args.audio_steps)
    encoder = build_audio_encoder(root, recipe=recipe, progress=progress)
    acc = encoder.info["accuracy"]
    print(f"audio tower {encoder.path} ({'trained' if encoder.trained else 'up to date'}): held-out zero-shot "
          f"accuracy {acc['heldout_image_prototypes']:.3f} against the image class prototypes, "
          f"{acc['heldout_text_prompts']:.3f} against the text prompts "
          f"({encoder.info['speech']['n_heldout']} clips, unseen voices)", flush=True)
    cache = load_cache(cache_dir, k=args.cache_k, temperature=args.cache_t, weight=args.cache_w, dim=128)
    loaded = ibllm.load(adapter, llama=args.llama, imagebind=encoder.path)
    sets = []
    for m in wanted:
        if m == "image":
            sets.append(image_inputs(str(heldout), args.limit))
        elif m == "text":
            sets.append(text_inputs())
        else:
            speech = write_spoken_digits(root / SPEECH_DIR, recipe.speech, progress=progress)
            sets.append(audio_inputs(speech, "heldout", progress))
    start = time.perf_counter()
    results = run_crossmodal(loaded.model, loaded.tokenizer, sets, cache, args.batch_size, examples=args.examples)
    table = markdown_table(results)
    print(table)
    print(f"({time.perf_counter() - start:.0f} s; cache {cache})", flush=True)
    if args.json:
        payload = {"cells": [{"input": r.modality, "cache": r.cache, "accuracy": r.accuracy, "correct": r.correct,
                              "n": r.n, "examples": r.examples[:10]} for r in results],
                   "table": table, "audio_tower": encoder.info["accuracy"], "adapter": str(adapter),
                   "cache": str(cache_dir), "text_templates": list(TEXT_TEMPLATES)}
        write_bytes_atomic(Path(args.json), json_module.dumps(payload, indent=1).encode())
    return results


def main(argv: Sequence[str] | None = None) -> list[CellResult]:
    """Entry point of ``python -m ibllm crossmodal``."""
    return run("crossmodal", argv)
