"""VisDial "MRR" as LVLM-eHub computes it: the generation (to the question alone) is compared with the
100 ``answer_options`` in file order; the reciprocal rank is ``1 / (i + 1)`` for the first option ``i``
that occurs (VQAv2-normalised, whole word) in the generation, 0 when none does. The ground-truth index
is not used."""

from __future__ import annotations

from collections.abc import Sequence

from ibllm.evaluation.text import has_word, normalize_vqa

PAPER_VISDIAL_MRR = 12.66  # ImageBind-LLM, percent


def reciprocal_rank(prediction: str, options: Sequence[str]) -> float:
    """``1/(i+1)`` for the first matching option, else 0."""
    pred = normalize_vqa(prediction)
    for i, option in enumerate(options):
        if has_word(pred, normalize_vqa(option)):
            return 1.0 / (i + 1)
    return 0.0


def visdial_mrr(predictions: Sequence[str], options: Sequence[Sequence[str]]) -> float:
    """Mean reciprocal rank in percent."""
    if len(predictions) != len(options):
        raise ValueError(f"{len(predictions)} predictions for {len(options)} option lists")
    if not options:
        raise ValueError("no VisDial samples to score")
    return 100.0 * sum(reciprocal_rank(p, o) for p, o in zip(predictions, options)) / len(options)
