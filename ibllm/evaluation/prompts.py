"""The paper's evaluation prompts and decoding settings (LVLM-eHub's LLaMA-Adapter wrapper; MME).

* Instruction per task: OCR ``what is written in the image?``; caption ``what is described in the
  image?``; VQA / KIE / VisDial / MME the sample's own question. Multiple choice (ScienceQA, IconQA):
  ``Question: {q}\\nOptions: {o1 o2 ...}\\n``; VSR: ``Question: Is the following caption right?
  {caption}\\nOptions: No Yes\\n``.
* Every instruction goes into the Alpaca no-input template (:func:`ibllm.processing.templates.format_prompt`).
* Decoding: temperature 0.1, top_p 0.75, at most 256 tokens of prompt + answer (``max_seq_len``); new
  tokens: 16 for captions, 256 otherwise (bounded by ``max_seq_len``).
* Images: LVLM-eHub's wrapper handed the encoder BGR images (a quirk). Off by default here (our
  checkpoints are trained on RGB); ``bgr=True`` (``--bgr``) reproduces the wrapper exactly.

All of these are fields of :class:`EvalSettings`, overridable from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ibllm.evaluation.readers import Sample
from ibllm.processing.templates import format_prompt

OCR_INSTRUCTION = "what is written in the image?"
CAPTION_INSTRUCTION = "what is described in the image?"
MAX_NEW_TOKENS = {"caption": 16}
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class EvalSettings:
    """Decoding and prompt settings of one evaluation (defaults: the paper's)."""

    temperature: float = 0.1
    top_p: float = 0.75
    max_seq_len: int = 256
    max_new_tokens: int | None = None  # None: per task (16 for captions, else 256)
    bgr: bool = False
    template: bool = True  # wrap the instruction in the Alpaca template
    seed: int = 0

    def new_tokens(self, task: str) -> int:
        """Generation budget of ``task``."""
        return self.max_new_tokens if self.max_new_tokens is not None else MAX_NEW_TOKENS.get(task, DEFAULT_MAX_NEW_TOKENS)

    def with_overrides(self, **overrides) -> "EvalSettings":
        """A copy with the non-None ``overrides`` applied."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def instruction(sample: Sample) -> str:
    """The instruction (before templating) the paper's protocol asks for ``sample``."""
    if sample.task == "ocr":
        return OCR_INSTRUCTION
    if sample.task == "caption":
        return CAPTION_INSTRUCTION
    if sample.task == "vqa" and sample.options:
        return f"Question: {sample.question}\nOptions: {' '.join(sample.options)}\n"
    if sample.task == "vqa" and "caption" in sample.extra:
        return f"Question: Is the following caption right? {sample.extra['caption']}\nOptions: No Yes\n"
    return sample.question


def build_prompt(sample: Sample, settings: EvalSettings | None = None) -> str:
    """The full prompt text for ``sample`` (Alpaca template unless ``settings.template`` is off)."""
    settings = settings or EvalSettings()
    text = instruction(sample)
    return format_prompt(text) if settings.template else text
