"""KIE word-level micro-F1 (LVLM-eHub): whitespace-split words, case-sensitive; per sample the matched
words are the multiset intersection of prediction and ground truth (greedy one-to-one matching);
precision, recall and F1 are pooled over the whole corpus; reported x100."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

PAPER_KIE = {"SROIE": 0.01, "FUNSD": 2.00}


def kie_counts(prediction: str, gt: str) -> tuple[int, int, int]:
    """``(matched, predicted words, ground-truth words)`` of one sample."""
    pred, ref = prediction.split(), gt.split()
    matched = sum((Counter(pred) & Counter(ref)).values())
    return matched, len(pred), len(ref)


def kie_f1(predictions: Sequence[str], gts: Sequence[str]) -> float:
    """Corpus micro-F1 x 100 (0 when nothing matched)."""
    if len(predictions) != len(gts):
        raise ValueError(f"{len(predictions)} predictions for {len(gts)} ground truths")
    if not gts:
        raise ValueError("no KIE samples to score")
    matched = predicted = reference = 0
    for p, g in zip(predictions, gts):
        m, n_p, n_g = kie_counts(p, g)
        matched, predicted, reference = matched + m, predicted + n_p, reference + n_g
    if matched == 0:
        return 0.0
    precision, recall = matched / predicted, matched / reference
    return 100.0 * 2 * precision * recall / (precision + recall)
