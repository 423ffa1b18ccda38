"""Words and captions of the digits demo: one caption list serves stage 0, the caption shards and the
instructions, and one rule decides which digits a text names."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

NUMBER_WORDS: tuple[str, ...] = tuple(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())
DIGIT_WORDS: tuple[str, ...] = NUMBER_WORDS[:10]
# The zero-shot prompt of stage 0 (the first caption template).
ZERO_SHOT_TEMPLATE = "a handwritten digit {w}"
# ``{w}``: the digit's word, ``{n}``: its numeral.
CAPTION_TEMPLATES: tuple[str, ...] = (
    ZERO_SHOT_TEMPLATE,
    "the number {w} written by hand",
    "a photo of the digit {n}",
    "a photo of the number {w}",
    "the digit {w} written by hand",
    "a handwritten {n}, the digit {w}",
    "a small grey digit {w} on a black background",
    "an image of the handwritten number {w}",
    "the number {w}",
)


def digit_word(d: int) -> str:
    """English word of a number 0–20 (``digit_word(7) == "seven"``)."""
    return NUMBER_WORDS[d]


def digits_mentioned(text: str) -> set[int]:
    """Digits 0–9 that ``text`` names, as a whole word (``seven``) or a numeral (``7``)."""
    low = text.lower()
    return {d for d in range(10) if re.search(rf"\b({digit_word(d)}|{d})\b", low)}


def caption_mentions_digit(text: str, d: int) -> bool:
    """True if ``text`` names digit ``d`` (word or numeral, whole word, case-insensitive)."""
    return d in digits_mentioned(text)


def caption_names_digit(caption: str, label: int) -> bool:
    """The stage-1 demo score: ``caption`` names exactly one digit, and it is ``label``."""
    return digits_mentioned(caption) == {int(label)}


def digit_caption(d: int, rng: random.Random, templates: Sequence[str] = CAPTION_TEMPLATES) -> str:
    """A caption for digit ``d`` from a template drawn with ``rng``."""
    return rng.choice(templates).format(w=digit_word(d), n=d)


def digit_captions(digit: int, templates: Sequence[str] = CAPTION_TEMPLATES) -> list[str]:
    """Every caption of ``digit``, one per template."""
    return [t.format(w=DIGIT_WORDS[digit], n=digit) for t in templates]


def class_prompts(template: str = ZERO_SHOT_TEMPLATE) -> list[str]:
    """The 10 zero-shot prompts, e.g. ``"a handwritten digit seven"``."""
    return [template.format(w=w, n=d) for d, w in enumerate(DIGIT_WORDS)]
