"""VQA top-1 accuracy as LVLM-eHub computes it: prediction and every ground truth go through the VQAv2
normalisation (:func:`ibllm.evaluation.text.normalize_vqa`); a sample is right when ANY ground truth
occurs as a whole word in the prediction (no VQAv2 ``min(#humans/3, 1)`` soft score)."""

from __future__ import annotations

from collections.abc import Sequence

from ibllm.evaluation.text import has_word, normalize_vqa

# The paper's zero-shot VQA / KGID accuracy (ImageBind-LLM; LVLM-eHub protocol), in percent.
PAPER_VQA = {"DocVQA": 4.04, "TextVQA": 23.98, "STVQA": 15.55, "OCR-VQA": 23.24, "OKVQA": 51.66, "GQA": 41.23,
             "IconQA": 37.97, "VSR": 49.37, "ScienceQA-IMG": 55.83, "VizWiz": 51.90}


def vqa_correct(prediction: str, gts: str | Sequence[str]) -> bool:
    """Whether any normalised ground truth is a whole-word match in the normalised prediction."""
    pred = normalize_vqa(prediction)
    gts = [gts] if isinstance(gts, str) else list(gts)
    return any(has_word(pred, normalize_vqa(gt)) for gt in gts)


def vqa_accuracy(predictions: Sequence[str], gts: Sequence[str | Sequence[str]]) -> float:
    """Top-1 accuracy in percent."""
    if len(predictions) != len(gts):
        raise ValueError(f"{len(predictions)} predictions for {len(gts)} ground truths")
    if not gts:
        raise ValueError("no VQA samples to score")
    return 100.0 * sum(vqa_correct(p, g) for p, g in zip(predictions, gts)) / len(gts)
