"""OCR word accuracy (LVLM-eHub): both texts keep only ``[a-zA-Z0-9\\s]`` and are lowercased; a sample
is right when the ground-truth word occurs as a whole word in the prediction."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ibllm.evaluation.text import has_word

NON_ALNUM = re.compile(r"[^a-zA-Z0-9\s]")

# The paper's zero-shot OCR word accuracy (ImageBind-LLM; LVLM-eHub protocol), in percent.
PAPER_OCR = {"IIIT5K": 13.9, "IC13": 7.43, "IC15": 11.94, "Total-Text": 10.79, "CUTE80": 20.14, "SVT": 8.35,
             "SVTP": 10.39, "COCO-Text": 5.59, "WordArt": 21.24, "CTW": 7.12, "HOST": 7.53, "WOST": 8.73}


def clean_ocr(text: str) -> str:
    """Drop every character outside ``[a-zA-Z0-9\\s]`` and lowercase."""
    return NON_ALNUM.sub("", text).lower()


def ocr_correct(prediction: str, gt: str) -> bool:
    """Whole-word match of the cleaned ground truth in the cleaned prediction."""
    return has_word(clean_ocr(prediction), clean_ocr(gt).strip())


def ocr_accuracy(predictions: Sequence[str], gts: Sequence[str]) -> float:
    """Word accuracy in percent over paired predictions and ground truths."""
    if len(predictions) != len(gts):
        raise ValueError(f"{len(predictions)} predictions for {len(gts)} ground truths")
    if not gts:
        raise ValueError("no OCR samples to score")
    return 100.0 * sum(ocr_correct(p, g) for p, g in zip(predictions, gts)) / len(gts)
