"""Held-out accuracy of the digits demo, measured before and after training (``experiments/demo_*.yaml``).

Stage 1: the greedy caption of a held-out digit image is correct when the digit it names (word or
numeral) is the image's label. Stage 2: a held-out question about a digit image is answered correctly
when the last key word of the answer (a number word, ``even`` or ``odd``) equals the reference's.
Both print one final line (``heldout_caption_accuracy: 0.93 (untrained: 0.10)``) and log to TensorBoard.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ibllm.demos.digits.captions import NUMBER_WORDS, caption_names_digit
from ibllm.generation import generate_tokens
from ibllm.processing.image import load_image
from ibllm.processing.samples import conversation_prompt_ids
from ibllm.processing.shards import expand_urls, read_tar_samples
from ibllm.processing.templates import caption_prompt, strip_image_placeholder

KEY_WORDS = set(NUMBER_WORDS) | {"even", "odd"}


def read_labelled_shards(urls: str | Sequence[str], limit: int | None = None) -> list[tuple[bytes, int]]:
    """``(image bytes, label)`` pairs from demo shards (``KEY.png`` + ``KEY.json`` with ``label``), in order."""
    pairs = []
    for url in expand_urls(urls):
        for sample in read_tar_samples(url):
            fields = sample.fields() if sample.key is not None else {}
            if "png" in fields and "json" in fields:
                pairs.append((fields["png"], json.loads(fields["json"])["label"]))
    return pairs[:limit] if limit else pairs


def last_key_word(text: str) -> str | None:
    """The last number word / ``even`` / ``odd`` in ``text`` (numerals 0–20 count as their word)."""
    words = re.findall(r"[a-z]+|\d+", text.lower())
    words = [NUMBER_WORDS[int(w)] if w.isdigit() and int(w) < len(NUMBER_WORDS) else w for w in words]
    keys = [w for w in words if w in KEY_WORDS]
    return keys[-1] if keys else None


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tok: Any, visual: torch.Tensor | None,
                   prompts: Sequence[str | list[int]], max_gen_len: int) -> list[str]:
    """Greedy answers of an ImageBindLLM for one visual token ``[B,1,D]`` (or None) + prompt per row
    (a string, encoded with BOS, or ready token ids)."""
    was_training = model.training
    model.eval()
    ids = [p if isinstance(p, list) else tok.encode(p, bos=True, eos=False) for p in prompts]
    outputs = generate_tokens(model, ids, visual, max_gen_len, temperature=0, eos_id=tok.eos_id)
    model.train(was_training)
    return [tok.decode(o).strip() for o in outputs]


@torch.no_grad()
def answer(pl_module: L.LightningModule, images: torch.Tensor, prompts: Sequence[str | list[int]],
           max_gen_len: int) -> list[str]:
    """Greedy answers of the module's model for one image + prompt per row."""
    model = pl_module.model
    was_training = model.training
    model.eval()
    visual = model.visual_token(image=images.to(model.prefix_query.weight.device))
    model.train(was_training)
    return greedy_answers(model, pl_module.tokenizer(), visual, prompts, max_gen_len)


class BeforeAfterAccuracy(L.Callback):
    """Scores ``evaluate()`` once before training (step 0) and once after; prints ``NAME: after (LABEL: before)``."""

    name = "accuracy"
    before_label = "before"

    def __init__(self) -> None:
        self.before: float | None = None
        self.after: float | None = None
        self.summary: str | None = None  # printed again by the CLI as the run's very last line

    def evaluate(self, pl_module: L.LightningModule) -> tuple[float, list[str]]:
        raise NotImplementedError

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before is None and trainer.global_step == 0 and trainer.is_global_zero:
            self.before, examples = self.evaluate(pl_module)
            print(f"{self.name} before training: {self.before:.3f}; e.g. {examples[:3]}", flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.after, examples = self.evaluate(pl_module)
        for line in examples[:6]:
            print("  " + line)
        for logger in trainer.loggers:
            logger.log_metrics({f"demo/{self.name}": self.after}, step=trainer.global_step)
        before = "n/a" if self.before is None else f"{self.before:.2f}"
        self.summary = f"{self.name}: {self.after:.2f} ({self.before_label}: {before})"
        print(self.summary, flush=True)

    def state_dict(self) -> dict:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = state_dict.get("before")


class DigitCaptionAccuracy(BeforeAfterAccuracy):
    """Stage-1 demo metric: held-out greedy captions that name the right digit."""

    name = "heldout_caption_accuracy"
    before_label = "untrained"

    def __init__(self, heldout: str | list[str], limit: int | None = None, batch_size: int = 60,
                 max_gen_len: int = 16) -> None:
        super().__init__()
        self.heldout, self.limit, self.batch_size, self.max_gen_len = heldout, limit, batch_size, max_gen_len

    def evaluate(self, pl_module: L.LightningModule) -> tuple[float, list[str]]:
        samples = read_labelled_shards(self.heldout, self.limit)
        correct, examples = 0, []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            images = torch.stack([load_image(png) for png, _ in chunk])
            captions = answer(pl_module, images, [caption_prompt()] * len(chunk), self.max_gen_len)
            for caption, (_, label) in zip(captions, chunk):
                ok = caption_names_digit(caption, label)
                correct += ok
                examples.append(f"[{label}] {caption!r} {'✓' if ok else '✗'}")
        return correct / max(1, len(samples)), examples


class DigitInstructionAccuracy(BeforeAfterAccuracy):
    """Stage-2 demo metric: every question of the held-out LLaVA file, asked in its conversation (the
    earlier turns with their reference answers as history, in the multi-turn template stage 2 trains on)."""

    name = "heldout_instruction_accuracy"
    before_label = "before finetune"

    def __init__(self, heldout: str, image_root: str | None = None, limit: int | None = None,
                 batch_size: int = 40, max_gen_len: int = 24) -> None:
        super().__init__()
        self.heldout, self.image_root, self.limit = heldout, image_root, limit
        self.batch_size, self.max_gen_len = batch_size, max_gen_len

    def questions(self) -> list[tuple[Path, list[tuple[str, str]], str, str]]:
        """``(image path, history, question, reference answer)`` for every turn of the held-out items."""
        root = Path(self.image_root) if self.image_root else Path(self.heldout).parent
        rows = []
        for item in json.loads(Path(self.heldout).read_text()):
            conv = item["conversations"]
            turns = [(strip_image_placeholder(u["value"]), a["value"]) for u, a in zip(conv[0::2], conv[1::2])]
            for i, (question, reference) in enumerate(turns):
                rows.append((root / item["image"], turns[:i], question, reference))
        return rows[: self.limit] if self.limit else rows

    def evaluate(self, pl_module: L.LightningModule) -> tuple[float, list[str]]:
        rows = self.questions()
        tok = pl_module.tokenizer()
        correct, examples = 0, []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            images = torch.stack([load_image(path) for path, _, _, _ in chunk])
            prompts = [conversation_prompt_ids(tok, history, q) for _, history, q, _ in chunk]
            replies = answer(pl_module, images, prompts, self.max_gen_len)
            for reply, (_, history, question, reference) in zip(replies, chunk):
                ok = last_key_word(reply) == last_key_word(reference)
                correct += ok
                examples.append(f"[turn {len(history) + 1}] {question!r} -> {reply!r} (ref {reference!r}) "
                                f"{'✓' if ok else '✗'}")
        return correct / max(1, len(rows)), examples
